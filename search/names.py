"""Plain names the search and the quick commands share, in a module that imports nothing:
``evomerge status`` reads a study's results without loading pydantic, Optuna or torch."""

from __future__ import annotations

DFS_SUFFIX = ":dfs"  # a PS+DFS search's second stage is the study <study>:dfs (search/stages.py)
# Optimizers with one objective per task (their class attribute multi_objective,
# search/optimizers; tests/test_cli_quick.py keeps the two equal).
MULTI_OBJECTIVE = frozenset({"nsga2"})
