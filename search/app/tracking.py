"""Optional experiment tracking: every finished candidate as one MLflow run.

A tracker is an observer of the search (search/observers.py) that hears of every finished
candidate; the commands open it and the controller names no backend. ``tracking.backend:
none`` (the default) is an observer that does nothing.
``mlflow`` logs to any MLflow tracking URI; the default, a SQLite file, works offline and
needs no server (``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows it).

Each run: name ``trial N``; params = the trial's genes as Optuna shows them (plus the
recipe's one-line summary); metrics = ``score.<task>`` and ``fitness``; tags = origin,
optimizer, study, candidate id, trial number, generation, recipe hash, state (and the
reason of a failure, the twin of a duplicate). Tracking observes the search and never
steers it: a failed log is one warning line, and the search goes on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Protocol

from evomerge.search.config import TrackingConfig
from evomerge.search.observers import QuietObserver, SearchObserver
from evomerge.search.origins import evolved
from evomerge.storage.kinds import State
from evomerge.storage.repository import CandidateRecord
from evomerge.workers.recipe import Recipe, parse_recipe

_MAX_PARAM = 500  # MLflow's oldest servers cap a param value at 500 characters


class MlflowTracker(QuietObserver):
    """One MLflow run per finished candidate, in one experiment (by default named after the study)."""

    def __init__(self, uri: str, experiment: str, study: str, optimizer: str,
                 genes: Callable[[Recipe], dict[str, float]]) -> None:
        """``genes`` gives a recipe's named genes (empty for one outside the search space)."""
        # MLflow sends usage telemetry unless told not to: a search logging to a local file
        # should not reach the network on its own (a user may set the variable either way).
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.study, self.optimizer, self.genes = study, optimizer, genes
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self._warned = False

    def finished(self, cand: CandidateRecord) -> None:
        """Log one finished (complete or failed) candidate; every call is synchronous."""
        try:
            self._log(cand)
        except Exception as exc:  # an observer must not stop the search; say it once
            if not self._warned:
                print(f"evomerge: warning: tracking to MLflow failed ({type(exc).__name__}: {exc}); "
                      "the search goes on", file=sys.stderr)
                self._warned = True

    def _log(self, cand: CandidateRecord) -> None:
        from mlflow.entities import Metric, Param, RunTag

        recipe = parse_recipe(cand.recipe_json)
        tags = run_tags(cand, self.study, self.optimizer)
        run = self.client.create_run(self.experiment_id, run_name=f"trial {cand.trial_number}", tags=tags)
        params = {**{k: repr(v) for k, v in self.genes(recipe).items()}, "recipe": recipe.summary()[:_MAX_PARAM]}
        metrics = run_metrics(cand)
        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                              metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(run.info.run_id, "FINISHED" if cand.state == State.COMPLETE else "FAILED")


def run_tags(cand: CandidateRecord, study: str, optimizer: str) -> dict[str, str]:
    """What a candidate's run is filed under."""
    tags = {"origin": cand.origin, "optimizer": optimizer, "study": study, "candidate_id": str(cand.id),
            "trial_number": str(cand.trial_number), "recipe_hash": cand.recipe_hash, "state": cand.state,
            "evolved": str(evolved(cand)).lower()}
    if cand.generation is not None:
        tags["generation"] = str(cand.generation)
    if cand.duplicate_of is not None:
        tags["duplicate_of"] = str(cand.duplicate_of)
    if cand.error:
        tags["error"] = cand.error[:_MAX_PARAM]
    return tags


def run_metrics(cand: CandidateRecord) -> dict[str, float]:
    """Per-task scores and the fitness (nothing for a failed candidate)."""
    out = {f"score.{task}": float(v) for task, v in (cand.scores or {}).items()}
    if cand.fitness is not None:
        out["fitness"] = float(cand.fitness)
    return out


class _Space(Protocol):
    def belongs(self, recipe: Recipe) -> bool: ...

    def params_of(self, recipe: Recipe) -> dict[str, float]: ...


def open_tracker(cfg: TrackingConfig, study: str, optimizer: str, space: _Space) -> SearchObserver:
    """The tracker the config names, logging into an experiment named after ``study``."""
    if cfg.backend == "none":
        return QuietObserver()

    def genes(recipe: Recipe) -> dict[str, float]:
        return space.params_of(recipe) if space.belongs(recipe) else {}

    return MlflowTracker(cfg.uri, cfg.experiment or study, study, optimizer, genes)

