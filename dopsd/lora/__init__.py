"""LoRA: injection through peft (inject), the files other tools load (layout, meta, files), a run's trained weights (trained),
the Hugging Face model card of an exported file (card)."""
