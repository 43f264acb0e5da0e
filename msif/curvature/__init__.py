"""msif.curvature."""
