"""Triton backend (being written)."""
