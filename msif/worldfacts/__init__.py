"""msif.worldfacts."""
