"""A thin adapter over lm-eval that scores an in-memory model, tasks built once."""

from __future__ import annotations

import logging
import math
from typing import Any

from evomerge.evaluators.tasks import TaskSuite, build_task_dict


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
        """Metric per task on the search split (or the held-out split); MissingMetric when
        lm-eval reports no value for a configured metric (``check_suite`` catches that first)."""
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
            key = spec.metric if "," in spec.metric else f"{spec.metric},none"  # "metric,filter"
            if key not in metrics:  # a missing metric is a wrong config, not a non-finite score: say so
                reported = ", ".join(k for k in metrics if "," in k and "_stderr," not in k)
                raise MissingMetric(f"task {spec.name!r} has no metric {spec.metric!r} (it reports: {reported})")
            value = metrics[key]
            scores[spec.name] = float(value) if isinstance(value, (int, float)) else math.nan
        return scores


class MissingMetric(ValueError):
    """lm-eval reported no value for a configured metric; the message is one line."""
