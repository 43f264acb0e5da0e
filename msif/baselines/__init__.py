"""msif.baselines."""
