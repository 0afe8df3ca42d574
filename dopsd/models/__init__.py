"""One small adapter per model family behind one protocol (`dopsd.models.base.ModelAdapter`)."""
