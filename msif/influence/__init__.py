"""msif.influence."""
