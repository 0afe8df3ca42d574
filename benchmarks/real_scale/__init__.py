"""The parts of benchmarks/gpu_real_scale.py: sampling at real scale (sampling) and the learning invariants of
its D-OPSD steps (invariants)."""
