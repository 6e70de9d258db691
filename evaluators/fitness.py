"""Fitness: a weighted mean of task metrics, refusing anything non-finite."""

from __future__ import annotations

import math
from collections.abc import Mapping

from evomerge.evaluators.spec import TaskSpec


class ScoreError(ValueError):
    """Scores that cannot become a fitness (missing or non-finite); one line."""


def fitness(scores: Mapping[str, float], tasks: tuple[TaskSpec, ...]) -> float:
    """Σ w_t · score_t / Σ w_t over the configured tasks."""
    total = sum(t.weight for t in tasks)
    if total <= 0:
        raise ScoreError("task weights sum to zero")
    acc = 0.0
    for task in tasks:
        if task.name not in scores:
            raise ScoreError(f"no score for task {task.name!r}")
        value = scores[task.name]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ScoreError(f"task {task.name!r} scored {value!r}")
        acc += task.weight * float(value)
    return acc / total
