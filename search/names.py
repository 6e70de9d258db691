"""Plain names the search and the quick commands share, in a module that imports nothing:
``evomerge status`` reads a study's results without loading pydantic, Optuna or torch."""

from __future__ import annotations

DFS_SUFFIX = ":dfs"  # a PS+DFS search's second stage is the study <study>:dfs (search/stages.py)
# Optimizers with one objective per task (their class attribute multi_objective,
# search/optimizers; tests/test_cli_quick.py keeps the two equal).
MULTI_OBJECTIVE = frozenset({"nsga2"})


# A study has companions in the same storage: <study>:dfs (search/stages.py, a PS+DFS search's
# second stage) and <study>:heldout (search/ledger.py, held-out re-scores in Optuna).
COMPANION_SUFFIXES = (DFS_SUFFIX, ":heldout")
MAX_STUDY_NAME = 255 - len(DFS_SUFFIX)  # evomerge_studies.name is VARCHAR(255) and holds <study>:dfs too


def check_study_name(name: str) -> str:
    """``name`` if the storage can hold it beside its companion studies; ValueError otherwise."""
    if len(name) > MAX_STUDY_NAME:
        raise ValueError(f"study name of {len(name)} characters; at most {MAX_STUDY_NAME}")
    reserved = [s for s in COMPANION_SUFFIXES if name.endswith(s)]
    if reserved:
        raise ValueError(f"study name {name!r} ends with {reserved[0]!r}, reserved for the companion "
                         f"studies <study>{' and <study>'.join(COMPANION_SUFFIXES)}")
    return name
