"""`dopsd probe`: the pre-flight check of a dataset against a model (run) and its image scorers (scorers)."""
