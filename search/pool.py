"""A pool of Ray evaluation actors that the controller keeps busy.

Ray is started here (local, bound to loopback, by default; ``address`` joins a cluster).
Each actor holds up to ``depth`` jobs: while it evaluates one, the next already waits in
its queue, so the controller's bookkeeping between results never leaves a worker idle.
A dead actor is reported as a :class:`Crash` of each job it held and replaced, so the
controller decides about retries and records every attempt.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from workers.actor import WorkerSpec, remote_worker_class
from workers.result import Job, TrialResult


@dataclass(frozen=True)
class Crash:
    """A job whose worker died (OOM kill, segfault, node loss) or raised outside our handling."""

    job: Job
    reason: str


@dataclass
class _Slot:
    actor: Any
    jobs: dict[Any, Job] = field(default_factory=dict)  # ObjectRef -> job, in submission order


class WorkerPool:
    """``count`` actors; submit jobs while there is room, wait for whichever finishes first."""

    def __init__(self, spec: WorkerSpec, count: int, num_cpus: float, num_gpus: float,
                 address: str | None = None, depth: int = 2) -> None:
        import ray

        self._ray = ray
        if not ray.is_initialized():
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            else:
                # Local: loopback only, as many CPUs as workers ask for (oversubscribing is the user's call).
                ray.init(num_cpus=max(int(count * num_cpus + 0.999), os.cpu_count() or 1),
                         num_gpus=None if num_gpus else 0, include_dashboard=False,
                         _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                         log_to_driver=False)
        self._cls = remote_worker_class(num_cpus, num_gpus)
        self._spec = spec
        self.depth = depth
        self.slots = [_Slot(self._cls.remote(spec)) for _ in range(count)]
        self.started = time.monotonic()
        self.work_s = 0.0  # seconds workers reported materializing and evaluating
        self.restarts = 0

    def wait_ready(self) -> list[str]:
        """Block until every actor has loaded its models; returns their names."""
        try:
            names = list(self._ray.get([s.actor.ready.remote() for s in self.slots]))
        except self._ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"a worker failed to start: {_cause(exc)}") from None
        self.started, self.work_s = time.monotonic(), 0.0  # utilisation counts from here
        return names

    def idle(self) -> int:
        """Free job places (at most ``depth`` per actor)."""
        return sum(self.depth - len(s.jobs) for s in self.slots)

    def active(self) -> int:
        """Actors holding at least one job."""
        return sum(1 for s in self.slots if s.jobs)

    def busy_jobs(self) -> list[Job]:
        return [job for s in self.slots for job in s.jobs.values()]

    def submit(self, job: Job) -> None:
        slot = min(self.slots, key=lambda s: len(s.jobs))  # the emptiest actor
        if len(slot.jobs) >= self.depth:
            raise RuntimeError("no free worker")
        slot.jobs[slot.actor.evaluate.remote(job)] = job

    def wait(self, timeout: float) -> list[TrialResult | Crash]:
        """Results of the jobs that finished within ``timeout`` seconds (maybe none)."""
        refs = [ref for s in self.slots for ref in s.jobs]
        if not refs:
            return []
        done, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        out: list[TrialResult | Crash] = []
        for slot in self.slots:
            for ref in [r for r in slot.jobs if r in done]:
                job = slot.jobs.pop(ref)
                try:
                    result: TrialResult = self._ray.get(ref)
                except (self._ray.exceptions.RayActorError, self._ray.exceptions.WorkerCrashedError) as exc:
                    out.append(Crash(job, f"worker died: {_cause(exc)}"))
                    out.extend(Crash(j, "worker died before this job ran") for j in slot.jobs.values())
                    slot.jobs.clear()
                    self._replace(slot)
                    break
                except self._ray.exceptions.RayTaskError as exc:
                    out.append(Crash(job, f"worker error: {_cause(exc)}"))
                    continue
                self.work_s += result.materialize_s + result.evaluate_s
                out.append(result)
        return out

    def _replace(self, slot: _Slot) -> None:
        try:
            self._ray.kill(slot.actor)
        except Exception:
            pass  # already gone
        slot.actor = self._cls.remote(self._spec)
        self.restarts += 1

    def utilisation(self) -> float:
        """Fraction of worker time spent materializing or evaluating since the workers were ready."""
        elapsed = (time.monotonic() - self.started) * len(self.slots)
        return self.work_s / elapsed if elapsed > 0 else 0.0

    def shutdown(self) -> None:
        for slot in self.slots:
            try:
                self._ray.kill(slot.actor)
            except Exception:
                pass  # already gone


def _cause(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
