"""Synthetic data for running and testing a federation without real patients."""
