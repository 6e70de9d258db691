"""A thin adapter over lm-eval that scores an in-memory model, tasks built once."""

from __future__ import annotations

import logging
import math
from typing import Any

from evomerge.evaluators.settings import FEWSHOT_SEED, prompt_key
from evomerge.evaluators.tasks import TaskSuite, build_task_dict, doc_samples


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
        self._tasks: dict[bool, dict[str, Any]] = {}
        self._samples: dict[bool, dict[str, list[int]]] = {}
        self._build(heldout=False)

    def _build(self, heldout: bool) -> None:
        tasks = build_task_dict(self.suite, heldout)
        self._tasks[heldout] = tasks
        self._samples[heldout] = doc_samples(self.suite, tasks, heldout)

    def score(self, heldout: bool = False) -> dict[str, float]:
        """Metric per task on the search split (or the held-out split); MissingMetric when
        lm-eval reports no value for a configured metric (``check_suite`` catches that first)."""
        from lm_eval.evaluator import evaluate

        if heldout not in self._tasks:
            self._build(heldout=True)
        tasks, samples = self._tasks[heldout], self._samples[heldout]
        by_name: dict[str, Any] = {}
        groups: dict[tuple[bool, str | None, bool], list[str]] = {}
        for spec in self.suite.tasks:  # lm-eval takes these settings per call, not per task
            names = groups.setdefault(prompt_key(spec), [])
            if spec.name not in names:
                names.append(spec.name)
        for (chat, system, multiturn), names in groups.items():
            for name in names:  # lm-eval's sampler advances per document: the same shots every call
                tasks[name].set_fewshot_seed(seed=FEWSHOT_SEED)
            # bootstrap_iters=0: standard errors are not used; log_samples off: no per-doc copies.
            results = evaluate(lm=self.lm, task_dict={n: tasks[n] for n in names},
                               samples={n: samples[n] for n in names if n in samples} or None,
                               system_instruction=system, apply_chat_template=chat, fewshot_as_multiturn=multiturn,
                               bootstrap_iters=0, log_samples=False, verbosity="WARNING")
            if results is None:
                raise RuntimeError("lm-eval returned no results")
            by_name.update(results["results"])  # keyed like the task dict we passed
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


    def prompts(self, heldout: bool = False) -> dict[str, list[str]]:
        """The context strings lm-eval built for each task at the last scoring of the split
        (one per request, in document order): what the model was shown."""
        return {name: [inst.args[0] for inst in task.instances]
                for name, task in self._tasks.get(heldout, {}).items()}


class MissingMetric(ValueError):
    """lm-eval reported no value for a configured metric; the message is one line."""
