"""Scoring: lm-eval tasks on an in-memory model, and fitness aggregation."""

if __name__ != "evomerge.evaluators":  # the folder is on sys.path when run from a checkout
    raise ImportError(f"{__name__!r} is evomerge's; import it as evomerge.evaluators")
