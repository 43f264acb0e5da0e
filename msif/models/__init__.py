"""msif.models."""
