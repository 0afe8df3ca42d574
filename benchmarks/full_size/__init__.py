"""The parts of benchmarks/cpu_full_size.py: model folders with random weights (folders, tokenizer), the measured
run of one CLI command (phase), the diffusers pipeline check (pipeline), the settings of each model (settings)
and the JSON / docs page (report)."""
