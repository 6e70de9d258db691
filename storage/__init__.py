"""Persistence: SQLAlchemy tables of our own beside Optuna's, and a small repository API."""
