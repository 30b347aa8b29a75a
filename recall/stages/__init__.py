"""Thin entry points for DVC stages: each reads its config section and calls pure functions."""
