"""The run folder: its files and summary, the start checks and locks, resumable checkpoints (no pickle)."""
