"""Sphinx extensions of the backprop_hooks documentation."""
