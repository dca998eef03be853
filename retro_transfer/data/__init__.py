"""Data: the synthetic shapes generator and loaders for real layouts."""
