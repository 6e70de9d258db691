"""A pool of Ray evaluation actors that the controller keeps busy.

Ray is started here (local, bound to loopback, by default; ``address`` joins a cluster).
A dead actor is reported as a :class:`Crash` of the job it held and replaced, so the
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
    """A job whose worker died (OOM kill, segfault, node loss)."""

    job: Job
    reason: str


@dataclass
class _Slot:
    actor: Any
    job: Job | None = None
    ref: Any = None
    since: float = 0.0
    busy_s: float = field(default=0.0)


class WorkerPool:
    """``count`` actors; submit jobs to idle ones, wait for whichever finishes first."""

    def __init__(self, spec: WorkerSpec, count: int, num_cpus: float, num_gpus: float,
                 address: str | None = None) -> None:
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
        self.slots = [_Slot(self._cls.remote(spec)) for _ in range(count)]
        self.started = time.monotonic()
        self.restarts = 0

    def wait_ready(self) -> list[str]:
        """Block until every actor has loaded its models; returns their names."""
        try:
            names = list(self._ray.get([s.actor.ready.remote() for s in self.slots]))
        except self._ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"a worker failed to start: {_cause(exc)}") from None
        self.started = time.monotonic()  # utilisation counts from here, not model loading
        return names

    def idle(self) -> int:
        return sum(1 for s in self.slots if s.job is None)

    def busy_jobs(self) -> list[Job]:
        return [s.job for s in self.slots if s.job is not None]

    def submit(self, job: Job) -> None:
        slot = next(s for s in self.slots if s.job is None)
        slot.job, slot.ref, slot.since = job, slot.actor.evaluate.remote(job), time.monotonic()

    def wait(self, timeout: float) -> list[TrialResult | Crash]:
        """Results of the jobs that finished within ``timeout`` seconds (maybe none)."""
        refs = [s.ref for s in self.slots if s.job is not None]
        if not refs:
            return []
        done, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        out: list[TrialResult | Crash] = []
        for slot in self.slots:
            if slot.job is None or slot.ref not in done:
                continue
            job, ref = slot.job, slot.ref
            slot.busy_s += time.monotonic() - slot.since
            slot.job, slot.ref = None, None
            try:
                out.append(self._ray.get(ref))
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.WorkerCrashedError) as exc:
                out.append(Crash(job, f"worker died: {_cause(exc)}"))
                self._replace(slot)
            except self._ray.exceptions.RayTaskError as exc:
                out.append(Crash(job, f"worker error: {_cause(exc)}"))
        return out

    def _replace(self, slot: _Slot) -> None:
        try:
            self._ray.kill(slot.actor)
        except Exception:
            pass
        slot.actor = self._cls.remote(self._spec)
        self.restarts += 1

    def utilisation(self) -> float:
        """Fraction of worker-seconds spent evaluating since the pool started."""
        elapsed = (time.monotonic() - self.started) * len(self.slots)
        now = time.monotonic()
        busy = sum(s.busy_s + (now - s.since if s.job is not None else 0.0) for s in self.slots)
        return busy / elapsed if elapsed > 0 else 0.0

    def shutdown(self) -> None:
        for slot in self.slots:
            try:
                self._ray.kill(slot.actor)
            except Exception:
                pass


def _cause(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
