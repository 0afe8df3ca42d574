"""LoRA: injection through peft (inject), the files other tools load (layout, meta, files), a run's trained weights (trained)."""
