"""A pool of Ray evaluation actors that the controller keeps busy.

Ray is started here (local, every socket on loopback, by default; ``address`` joins a
cluster). Each actor holds up to ``depth`` jobs: while it evaluates one, the next already
waits in its queue, so the controller's bookkeeping between results never leaves a worker
idle. The pool reports faults as facts and leaves retries to the controller:

- a dead actor is a :class:`Crash` of each job it held (``ran`` tells whether the job
  had started: one that never ran spends no attempt), and is replaced after a back-off;
- a job running past its time limit (:class:`JobTimeout`) marks its worker hung: the
  actor is killed and replaced, the job is a :class:`Crash` naming the limit and worker;
- workers that keep dying with no job finishing between raise :class:`WorkersFailing`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from evomerge.workers.ray_internals import start_on_loopback
from evomerge.workers.result import Job, TrialResult
from evomerge.workers.worker_spec import WorkerSpec

STARTUP_S = 900.0  # time limit of a job before any job of its split has finished
FLOOR_S = 60.0  # the derived limit never drops below this
SLOWEST_FACTOR = 5.0  # derived limit: this many times the slowest finished job of the split
BACKOFF_S = (1.0, 60.0)  # restart delay after the first death in a row, and its cap (doubling)
DEATHS_PER_WORKER = 2  # deaths in a row (per worker, at least 5) with no job finished: give up


@dataclass(frozen=True)
class Crash:
    """A job whose worker died (OOM kill, segfault, node loss, hang) or raised outside our handling.

    ``ran`` is False when the job never started (it waited behind another job on a worker
    that died): it spends no attempt.
    """

    job: Job
    reason: str
    ran: bool = True
    worker: str | None = None  # the lost worker's name (host:pid): on a cluster, which node


class WorkersFailing(RuntimeError):
    """Workers keep dying with no job finishing between: the search cannot go on (one line)."""


class JobTimeout:
    """How long one job may run before its worker counts as hung.

    ``fixed_s`` (``workers.job_timeout_s``) wins. Otherwise the limit derives from what
    finished: ``max(FLOOR_S, SLOWEST_FACTOR x the slowest job so far)``, per split (held-out
    splits may be larger), and ``STARTUP_S`` until a job of that split has finished.
    """

    def __init__(self, fixed_s: float | None = None) -> None:
        self.fixed_s = fixed_s
        self._slowest: dict[bool, float] = {}

    def observe(self, heldout: bool, seconds: float) -> None:
        self._slowest[heldout] = max(seconds, self._slowest.get(heldout, 0.0))

    def limit(self, heldout: bool) -> float:
        if self.fixed_s is not None:
            return self.fixed_s
        slowest = self._slowest.get(heldout)
        return STARTUP_S if slowest is None else max(FLOOR_S, SLOWEST_FACTOR * slowest)


class RemoteWorker:
    """The actor Ray runs: an :class:`evomerge.workers.actor.EvalWorker` built in the worker's own
    process. The controller only creates actors, so it never imports the worker's engine (torch's
    models, transformers', lm-eval): ~2 s less at every controller start."""

    def __init__(self, spec: WorkerSpec) -> None:
        from evomerge.workers.actor import EvalWorker  # in the worker process only

        self._worker = EvalWorker(spec)

    def ready(self) -> str:
        return self._worker.ready()

    def evaluate(self, job: Job) -> TrialResult:
        return self._worker.evaluate(job)


@dataclass
class _Slot:
    actor: Any | None  # None while it waits for a restart (after restart_at)
    name: str = "?"
    jobs: dict[Any, Job] = field(default_factory=dict)  # ObjectRef -> job, in submission (= run) order
    since: float = 0.0  # when the first job in ``jobs`` started running
    starting: Any | None = None  # ObjectRef of a replacement actor's ready() call
    restart_at: float = 0.0

    @property
    def ready(self) -> bool:
        return self.actor is not None and self.starting is None


class WorkerPool:
    """``count`` actors; submit jobs while there is room, wait for whichever finishes first."""

    def __init__(self, spec: WorkerSpec, count: int, num_cpus: float, num_gpus: float,
                 address: str | None = None, depth: int = 2, job_timeout_s: float | None = None) -> None:
        self._ray = _start_ray(count, num_cpus, num_gpus, address)
        errors = self._ray.exceptions
        # How a dead worker shows: OOM kills raise OutOfMemoryError, not an actor error.
        self._died = (errors.RayActorError, errors.WorkerCrashedError, errors.OutOfMemoryError)
        # max_task_retries=0: the controller records every attempt and decides on retries itself.
        self._cls = self._ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                                     max_task_retries=0)(RemoteWorker)
        self._spec = spec
        self.depth = depth
        self.timeout = JobTimeout(job_timeout_s)
        self.slots = [_Slot(self._cls.remote(spec)) for _ in range(count)]
        self.started = time.monotonic()
        self.work_s = 0.0  # seconds workers reported materializing and evaluating
        self.restarts = 0
        self.deaths_in_row = 0  # worker deaths since the last job that finished
        self.max_deaths_in_row = max(5, DEATHS_PER_WORKER * count)

    def wait_ready(self) -> list[str]:
        """Block until every actor has loaded its models; returns their names."""
        try:
            names = list(self._ray.get([s.actor.ready.remote() for s in self.slots if s.ready]))
        except self._died as exc:
            raise RuntimeError(f"a worker failed to start: {_cause(exc)}") from None
        for slot, name in zip([s for s in self.slots if s.ready], names):
            slot.name = name
        self.started, self.work_s = time.monotonic(), 0.0  # utilisation counts from here
        return names

    def idle(self) -> int:
        """Free job places (at most ``depth`` per started actor)."""
        return sum(self.depth - len(s.jobs) for s in self.slots if s.ready)

    def active(self) -> int:
        """Actors holding at least one job."""
        return sum(1 for s in self.slots if s.jobs)

    def restarting(self) -> int:
        """Actors being replaced: no room for jobs now, but soon."""
        return sum(1 for s in self.slots if not s.ready)

    def busy_jobs(self) -> list[Job]:
        return [job for s in self.slots for job in s.jobs.values()]

    def submit(self, job: Job) -> None:
        ready = [s for s in self.slots if s.ready]
        slot = min(ready, key=lambda s: len(s.jobs)) if ready else None  # the emptiest actor
        if slot is None or len(slot.jobs) >= self.depth:
            raise RuntimeError("no free worker")
        if not slot.jobs:
            slot.since = time.monotonic()
        slot.jobs[slot.actor.evaluate.remote(job)] = job

    def wait(self, timeout: float) -> list[TrialResult | Crash]:
        """Results of the jobs that finished within ``timeout`` seconds (maybe none).

        Also restarts replaced workers when their back-off is over, and fails jobs that ran
        past their time limit. Raises :class:`WorkersFailing` when workers keep dying.
        """
        now = time.monotonic()
        for slot in self.slots:
            if slot.actor is None and now >= slot.restart_at:
                slot.actor = self._cls.remote(self._spec)
                slot.starting = slot.actor.ready.remote()
        refs = [ref for s in self.slots for ref in (*s.jobs, *([s.starting] if s.starting else []))]
        # Wake up for the next job deadline or restart, whichever comes first.
        wake = [s.since + self.timeout.limit(next(iter(s.jobs.values())).heldout) for s in self.slots if s.jobs]
        wake += [s.restart_at for s in self.slots if s.actor is None]
        timeout = max(0.0, min([timeout, *(t - now for t in wake)]))
        if not refs:
            if self.restarting():
                time.sleep(timeout)
            return []
        done, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        out: list[TrialResult | Crash] = []
        for slot in self.slots:
            if slot.starting is not None and slot.starting in done:
                self._started(slot)
            for ref in [r for r in slot.jobs if r in done]:
                job = slot.jobs.pop(ref)
                try:
                    result: TrialResult = self._ray.get(ref)
                except self._died as exc:
                    slot.jobs = {ref: job, **slot.jobs}  # back in front: it was the one running
                    out.extend(self._lose(slot, f"worker died: {_cause(exc)}"))
                    break  # its other jobs are reported with it
                except self._ray.exceptions.RayTaskError as exc:
                    out.append(Crash(job, f"worker error: {_cause(exc)}", worker=slot.name))
                    slot.since = time.monotonic()
                    continue
                slot.since = time.monotonic()  # the next queued job starts now
                self.deaths_in_row = 0
                self.work_s += result.materialize_s + result.evaluate_s
                self.timeout.observe(job.heldout, result.materialize_s + result.evaluate_s)
                out.append(result)
        out.extend(self._expire())
        return out

    def _started(self, slot: _Slot) -> None:
        """A replacement actor finished loading, or died trying."""
        ref, slot.starting = slot.starting, None
        try:
            slot.name = self._ray.get(ref)
        except self._died as exc:
            self._lose(slot, f"a replacement worker died while starting: {_cause(exc)}")

    def _expire(self) -> list[Crash]:
        """Jobs past their time limit: their worker is hung; kill and replace it."""
        now = time.monotonic()
        out: list[Crash] = []
        for slot in self.slots:
            if not slot.jobs:
                continue
            limit = self.timeout.limit(next(iter(slot.jobs.values())).heldout)
            if now - slot.since > limit:
                out.extend(self._lose(slot, f"timed out after {limit:.0f} s on worker {slot.name}"))
        return out

    def _lose(self, slot: _Slot, reason: str) -> list[Crash]:
        """The slot's actor is dead or hung: report its jobs, schedule a replacement after a back-off."""
        name, jobs = slot.name, self._retire(slot)
        self.restarts += 1
        self.deaths_in_row += 1
        if self.deaths_in_row >= self.max_deaths_in_row:
            raise WorkersFailing(f"workers keep dying: {self.deaths_in_row} deaths in a row with no job "
                                 f"finished between; the last: {reason}")
        base, cap = BACKOFF_S
        slot.restart_at = time.monotonic() + min(cap, base * 2 ** (self.deaths_in_row - 1))
        # Only the first job had started; the ones queued behind it never ran.
        return [Crash(job, reason, ran=i == 0, worker=name)
                for i, job in enumerate(jobs)]

    def cancel(self) -> list[Job]:
        """Forget every job in flight (a deadline passed): their actors are killed and replaced
        at once, since a job cannot be taken back from a Ray actor's queue. Returns the jobs."""
        jobs: list[Job] = []
        for slot in self.slots:
            if slot.jobs:
                jobs += self._retire(slot)
                slot.restart_at = time.monotonic()
        return jobs

    def _retire(self, slot: _Slot) -> list[Job]:
        """Kill the slot's actor (dead, hung or busy with forgotten work); returns its jobs."""
        jobs = list(slot.jobs.values())
        slot.jobs.clear()
        _kill(self._ray, slot.actor)
        slot.actor, slot.starting = None, None
        return jobs

    def job_limit(self, heldout: bool = False) -> float:
        """The current time limit of one job (see :class:`JobTimeout`)."""
        return self.timeout.limit(heldout)

    def utilisation(self) -> float:
        """Fraction of worker time spent materializing or evaluating since the workers were ready."""
        elapsed = (time.monotonic() - self.started) * len(self.slots)
        return self.work_s / elapsed if elapsed > 0 else 0.0

    def shutdown(self) -> None:
        for slot in self.slots:
            _kill(self._ray, slot.actor)


def _kill(ray: Any, actor: Any) -> None:
    if actor is not None:
        try:
            ray.kill(actor)
        except Exception:
            pass  # already gone


# Only the controller talks to the database: workers never see its credentials.
def controller_only(name: str) -> bool:
    return name.startswith("PG") or name in ("EVOMERGE_STORAGE", "DATABASE_URL")


def _start_ray(count: int, num_cpus: float, num_gpus: float, address: str | None) -> Any:
    """Ray, joined (``address``) or started here with every socket on loopback."""
    if address:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return ray
    ray = start_on_loopback(max(int(count * num_cpus + 0.999), os.cpu_count() or 1), num_gpus, controller_only)
    node = ray.util.get_node_ip_address()
    if node not in ("127.0.0.1", "::1"):
        ray.shutdown()
        raise RuntimeError(f"Ray started on {node}, not on loopback; refusing to run workers there")
    return ray


# What Ray's memory monitor says when it kills a worker (its generic death message only
# lists the OOM killer among possible causes: that does not count).
_OOM_WORDS = re.compile(r"memory pressure|low on memory|OutOfMemoryError", re.IGNORECASE)


def _cause(exc: BaseException) -> str:
    """One line for a worker's death; named OOM when Ray says so."""
    import ray

    text = " ".join(str(exc).split())
    oom = isinstance(exc, ray.exceptions.OutOfMemoryError) or _OOM_WORDS.search(text) is not None
    return ("out of memory (OOM): " if oom else "") + text[:300]
