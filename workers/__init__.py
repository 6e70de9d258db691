"""Merge engine and Ray workers: recipes, merge operators, in-place materialization, replay."""
