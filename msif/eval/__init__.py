"""msif.eval."""
