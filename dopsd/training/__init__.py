"""Training: `dopsd.train` (api), the Trainer and its one loop, checkpointed state, the monitor, few-step health, the
optimizer, continual tuning."""
