"""Adapter registry: versioned, validated, atomic storage of adapters and models."""
