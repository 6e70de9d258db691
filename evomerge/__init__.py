"""evomerge: evolutionary search over LLM merge recipes.

The repository keeps one folder per part (``search/``, ``workers/``, ``evaluators/``,
``storage/``, ``demo/``); they install as subpackages of this one (``evomerge.search``
and so on), so nothing of ours lands at the top level of site-packages.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("evomerge")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
