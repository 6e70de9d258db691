"""Persistence: SQLAlchemy tables of our own beside Optuna's, and a small repository API."""

if __name__ != "evomerge.storage":  # the folder is on sys.path when run from a checkout
    raise ImportError(f"{__name__!r} is evomerge's; import it as evomerge.storage")
