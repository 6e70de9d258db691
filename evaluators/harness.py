"""A thin adapter over lm-eval that scores an in-memory model, tasks built once."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.evaluators.batching import CPU_BATCH, BatchSize
from evomerge.evaluators.lm_eval_adapter import lm_class
from evomerge.evaluators.racing import Partial, keep_going
from evomerge.evaluators.settings import FEWSHOT_SEED, DocSample, document_order, prompt_key
from evomerge.evaluators.spec import TaskSpec, TaskSuite
from evomerge.evaluators.tasks import build_task_dict, doc_samples


@dataclass(frozen=True)
class Scoring:
    """Scores of one candidate on the search split, the documents they rest on, and whether
    the evaluation ran to the end (False: stopped by racing, scores from the first stage)."""

    scores: dict[str, float]
    documents: int
    complete: bool


def _mean_metric(task: Any, metric: str) -> bool:
    """Whether lm-eval aggregates ``metric`` of ``task`` as a plain mean over documents."""
    aggregation = task.aggregation().get(metric.partition(",")[0])
    return getattr(aggregation, "__name__", "") == "mean"


class Evaluator:
    """Scores whatever weights ``model`` holds at call time on the suite's tasks.

    The HFLM wrapper and the lm-eval Task objects are built once; a worker rewrites the
    model's weights in place between calls and HFLM picks them up. ``batch_size``: a fixed
    batch, or "auto": found per task on a CUDA device, :data:`CPU_BATCH` elsewhere
    (evaluators/batching.py). ``lm``: an lm-eval ``LM`` that scores ``model`` instead of the
    HF one built here (the seam of another backend).
    """

    def __init__(self, suite: TaskSuite, model: Any, tokenizer: Any, batch_size: BatchSize = "auto",
                 device: str = "cpu", lm: Any | None = None) -> None:
        for name in ("lm-eval", "lm_eval"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.suite = suite
        if batch_size == "auto" and not device.startswith("cuda"):
            batch_size = CPU_BATCH  # host memory is not probed (evaluators/batching.py)
        # the seam a scoring backend plugs into: any lm-eval LM over ``model`` (docs/performance.md)
        self.lm = lm if lm is not None else lm_class()(batch=batch_size, pretrained=model, tokenizer=tokenizer,
                                                        device=device)
        self._tasks: dict[bool, dict[str, Any]] = {}
        self._samples: dict[bool, dict[str, list[int]]] = {}
        self._order: dict[str, list[int]] | None = None  # racing: built on first use
        self._cuts: dict[str, tuple[int, ...]] = {}  # documents scored after each stage, per raced task
        self._build(heldout=False)

    def _build(self, heldout: bool) -> None:
        tasks = build_task_dict(self.suite, heldout)
        self._tasks[heldout] = tasks
        self._samples[heldout] = doc_samples(self.suite, tasks, heldout)

    def score(self, heldout: bool = False) -> dict[str, float]:
        """Metric per task on the search split (or the held-out split); MissingMetric when
        lm-eval reports no value for a configured metric (``check_suite`` catches that first)."""
        if heldout not in self._tasks:
            self._build(heldout=True)
        return self._scores(heldout, self._samples[heldout], self.suite.tasks)

    def race(self, bar: float | None) -> Scoring:
        """Scores on the search split in stages (evaluators/racing.py), stopping after a stage
        when the candidate cannot reach ``bar``; the full scores when nothing is raced."""
        order = self._race_order() if bar is not None else {}  # no bar (racing off, baselines): no order
        if not order:
            return Scoring(self.score(), self._documents(self._samples[False]), complete=True)
        specs = self.suite.tasks
        weights = {s.name: s.weight for s in specs}
        seen = {name: 0 for name in order}
        scores: dict[str, float] = {}
        documents = 0
        for stage in range(max(len(c) for c in self._cuts.values())):
            part = {name: DocSample(docs[seen[name]:self._cuts[name][min(stage, len(self._cuts[name]) - 1)]])
                    for name, docs in order.items() if seen[name] < len(docs)}
            # the first stage also scores the tasks that are not raced, in full and once
            samples = {**self._samples[False], **part} if stage == 0 else part
            todo = specs if stage == 0 else tuple(s for s in specs if s.name in part)
            got = self._scores(False, samples, todo)
            documents += self._documents(samples) if stage == 0 else sum(len(d) for d in part.values())
            for spec in todo:
                if spec.name in part:  # a mean over disjoint parts of the sample
                    n, k = seen[spec.name], len(part[spec.name])
                    scores[spec.name] = (n * scores.get(spec.name, 0.0) + k * got[spec.name]) / (n + k)
                    seen[spec.name] = n + k
                else:
                    scores[spec.name] = got[spec.name]
            if all(seen[name] == len(docs) for name, docs in order.items()):
                break
            partials = {s.name: Partial(scores[s.name], seen[s.name], len(order[s.name])) if s.name in order
                        else Partial(scores[s.name], 1, 1) for s in specs}
            if not keep_going(partials, weights, bar, self.suite.racing.confidence):
                return Scoring(scores, documents, complete=False)
        return Scoring(scores, documents, complete=True)

    def _race_order(self) -> dict[str, list[int]]:
        """The raced tasks' documents in their seeded order (built once): tasks whose metric
        is a mean over documents and whose first stage is big enough."""
        if self._order is None:
            self._order, self._cuts = {}, {}
            for spec in self.suite.tasks:
                task = self._tasks[False][spec.name]
                order = document_order(len(task.eval_docs), self.suite.limit, self.suite.sample_seed, spec.name,
                                       task.config.test_split or "")
                cuts = self.suite.racing.cuts(len(order))
                if cuts is not None and _mean_metric(task, spec.metric):
                    self._order[spec.name], self._cuts[spec.name] = order, cuts
        return self._order

    def _documents(self, samples: Mapping[str, list[int]]) -> int:
        return sum(len(samples[s.name]) if s.name in samples else len(self._tasks[False][s.name].eval_docs)
                   for s in self.suite.tasks)

    def _scores(self, heldout: bool, samples: Mapping[str, list[int]], specs: tuple[TaskSpec, ...]
                ) -> dict[str, float]:
        """One lm-eval pass over ``specs`` on ``samples`` (tasks absent from it: every document)."""
        from lm_eval.evaluator import evaluate

        tasks = self._tasks[heldout]
        by_name: dict[str, Any] = {}
        groups: dict[tuple[bool, str | None, bool], list[str]] = {}
        for spec in specs:  # lm-eval takes these settings per call, not per task
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
        for spec in specs:
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
