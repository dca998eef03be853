"""Compatibility shims for optional dependencies that do not install cleanly everywhere."""
