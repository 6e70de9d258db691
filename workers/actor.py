"""The evaluation worker: loads the sources once, then materializes and scores candidates.

One worker per device. It is a plain class so it can run in-process (replay, tests of
the engine); workers/pool.py runs it inside a Ray actor. Workers never touch the database:
they return :class:`TrialResult` values to the controller.
"""

from __future__ import annotations

import math
import os
import socket
import time

import torch

from evomerge.evaluators.harness import Evaluator, Scoring
from evomerge.workers.candidate_model import CandidateModel
from evomerge.workers.materialize import Materializer
from evomerge.workers.recipe import parse_recipe
from evomerge.workers.result import Failed, Job, Scored, TrialResult
from evomerge.workers.worker_spec import WorkerSpec


class EvalWorker:
    """Materializes each candidate in place and scores it with lm-eval."""

    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(spec.threads)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.materializer = Materializer(spec.folders, spec.base, getattr(torch, spec.dtype), spec.device,
                                         spec.allow_pickle, spec.sources)
        self.candidate = CandidateModel(self.materializer)  # sources, merges and layer routes
        # Scoring passes never reuse a KV cache: do not build one (each route hop would hold its
        # own). lm-eval's generation asks for the cache explicitly.
        self.materializer.model.config.use_cache = False
        self.evaluator = Evaluator(spec.suite, self.materializer.model, self.materializer.tokenizer,
                                   spec.batch_size, spec.device)

    def ready(self) -> str:
        return self.name

    def evaluate(self, job: Job) -> TrialResult:
        """Materialize ``job``'s recipe and score it; errors come back as :class:`Failed`."""
        start = time.perf_counter()
        try:
            self.candidate.apply(parse_recipe(job.recipe_json))
        except Exception as exc:  # a bad recipe or a non-finite merge fails this trial only
            return TrialResult(job, Failed(f"materialize: {_one_line(exc)}"), self.name,
                               time.perf_counter() - start, 0.0)
        merged, cpu = time.perf_counter(), time.process_time()
        try:
            if job.heldout:
                scoring = Scoring(self.evaluator.score(heldout=True), 0, complete=True)
            else:
                scoring = self.evaluator.race(job.bar)
        except Exception as exc:
            return TrialResult(job, Failed(f"evaluate: {_one_line(exc)}"), self.name,
                               merged - start, time.perf_counter() - merged)
        done = time.perf_counter()
        bad = [k for k, v in scoring.scores.items() if not math.isfinite(v)]
        outcome: Scored | Failed = (Failed(f"non-finite score for task {bad[0]!r}") if bad
                                    else Scored(scoring.scores))
        return TrialResult(job, outcome, self.name, merged - start, done - merged,
                           None if job.heldout else scoring.documents, scoring.complete,
                           time.process_time() - cpu)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
