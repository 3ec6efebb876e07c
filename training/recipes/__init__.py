"""Training recipes: one command each that reproduces a released model."""
