"""msif.report."""
