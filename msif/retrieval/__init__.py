"""msif.retrieval."""
