"""Datasets: parsing and validation (no torch) and tokenization for training."""
