"""The controller: config, search space, optimizer, the evaluation loop and the CLI."""

if __name__ != "evomerge.search":  # the folder is on sys.path when run from a checkout
    raise ImportError(f"{__name__!r} is evomerge's; import it as evomerge.search")
