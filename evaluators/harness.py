"""A thin adapter over lm-eval that scores an in-memory model, tasks built once."""

from __future__ import annotations

import logging
import math
from typing import Any

from evaluators.tasks import TaskSuite, build_task_dict


class Evaluator:
    """Scores whatever weights ``model`` holds at call time on the suite's tasks.

    The HFLM wrapper and the lm-eval Task objects are built once; a worker rewrites the
    model's weights in place between calls and HFLM picks them up.
    """

    def __init__(self, suite: TaskSuite, model: Any, tokenizer: Any, batch_size: int = 64,
                 device: str = "cpu") -> None:
        from lm_eval.models.huggingface import HFLM

        for name in ("lm-eval", "lm_eval"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.suite = suite
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        self._tasks: dict[bool, dict[str, Any]] = {False: build_task_dict(suite, heldout=False)}

    def score(self, heldout: bool = False) -> dict[str, float]:
        """Metric per task on the search split (or the held-out split)."""
        from lm_eval.evaluator import evaluate

        if heldout not in self._tasks:
            self._tasks[heldout] = build_task_dict(self.suite, heldout=True)
        tasks = self._tasks[heldout]
        # bootstrap_iters=0: standard errors are not used; log_samples off: no per-doc copies.
        results = evaluate(lm=self.lm, task_dict=dict(tasks), limit=self.suite.limit,
                           bootstrap_iters=0, log_samples=False, verbosity="WARNING")
        if results is None:
            raise RuntimeError("lm-eval returned no results")
        by_name = results["results"]  # keyed like the task dict we passed
        scores: dict[str, float] = {}
        for spec in self.suite.tasks:
            metrics = by_name.get(spec.name, {})
            value = metrics.get(f"{spec.metric},none", metrics.get(spec.metric, math.nan))
            scores[spec.name] = float(value) if isinstance(value, (int, float)) else math.nan
        return scores
