"""The training methods as loss terms (terms), and the paper's baselines (baselines)."""
