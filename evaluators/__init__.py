"""Scoring: lm-eval tasks on an in-memory model, and fitness aggregation."""
