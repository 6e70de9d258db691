"""The built-in demo: tiny cipher models, their lm-eval tasks, and the script that builds them."""

if __name__ != "evomerge.demo":  # the folder is on sys.path when run from a checkout
    raise ImportError(f"{__name__!r} is evomerge's; import it as evomerge.demo")
