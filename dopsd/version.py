"""dopsd's version: at the bottom of the layers, so that the run folder's marker can record it."""

__version__ = "0.1.0"
