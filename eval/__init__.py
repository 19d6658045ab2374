"""Experiments on top of backprop_hooks: perturbation, masking, data sets, reports and plots."""
