"""The training methods as loss terms (terms), the paper's baselines (baselines), and what a term sees of the
training step it runs in (step: `StepContext`, `Term`)."""
