"""Merge engine and Ray workers: recipes, merge operators, in-place materialization, replay."""

if __name__ != "evomerge.workers":  # the folder is on sys.path when run from a checkout
    raise ImportError(f"{__name__!r} is evomerge's; import it as evomerge.workers")
