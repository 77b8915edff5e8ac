"""Helpers for the tokensqueeze-companion notebooks: one module per pipeline stage."""

__version__ = "0.1.0"
