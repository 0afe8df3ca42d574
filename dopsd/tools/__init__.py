"""What users run on trained models: sampling features, evaluation, the pre-flight probe, export."""
