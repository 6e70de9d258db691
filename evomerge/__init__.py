"""evomerge: evolutionary search over LLM merge recipes.

The repository keeps one folder per part (``search/``, ``workers/``, ``evaluators/``,
``storage/``, ``demo/``); they install as subpackages of this one (``evomerge.search``
and so on), so nothing of ours lands at the top level of site-packages.
"""

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed metadata on first use: importlib.metadata
    costs a tenth of a second, which every quick command would pay at import otherwise."""
    if name != "__version__":
        raise AttributeError(f"module 'evomerge' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evomerge")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
