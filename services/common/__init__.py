"""Shared server runtime: settings, logging, errors, interceptors, metrics, serving."""
