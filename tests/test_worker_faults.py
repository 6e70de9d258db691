"""Workers that hang (SIGSTOP), that cannot restart, and that crash during held-out re-scoring.

Real Ray workers, real signals. A hung worker must not hold a search (per-job time limit and
the search's own deadline); a job that never ran spends no attempt; workers that keep dying
stop the search with one line instead of failing healthy candidates.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from evomerge.search.app.commands import prepare
from evomerge.search.config import load_config
from evomerge.workers.pool import JobTimeout, WorkerPool, WorkersFailing, _cause
from evomerge.storage.kinds import Split
from evomerge.storage.repository import Repository
from tests.clocks import StartedClock
from tests.helpers import write_config
from tests.test_failures import _controller
from evomerge.workers.worker_spec import WorkerSpec

HANG_GUARD_S = 240.0  # a run still stuck this long after the stop is hung (old code): let it go


def _pid(pool: WorkerPool, slot: int) -> int:
    return int(pool.slots[slot].name.rpartition(":")[2])


class _Stopper:
    """Stops (SIGSTOP) worker 0's process while it runs a job, once ``ready`` says so; lets it
    go again after ``HANG_GUARD_S`` so that code without a time limit ends (and fails)."""

    def __init__(self, get_pool: Callable[[], WorkerPool | None], ready: Callable[[], bool],
                 stopped: Callable[[], None] = lambda: None) -> None:
        self.pid: int | None = None
        self.stopped_at = 0.0
        self.released = False
        self._get_pool, self._ready, self._stopped = get_pool, ready, stopped
        self._end = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        deadline = time.monotonic() + 300
        while self.pid is None and time.monotonic() < deadline and not self._end.is_set():
            pool = self._get_pool()
            if pool is not None and pool.slots[0].jobs and pool.slots[0].ready and self._ready():
                self.pid = _pid(pool, 0)
                os.kill(self.pid, signal.SIGSTOP)
                self.stopped_at = time.monotonic()
                self._stopped()
            time.sleep(0.05)
        if self.pid is not None and not self._end.wait(HANG_GUARD_S):
            self.released = True
            _signal(self.pid, signal.SIGCONT)

    def close(self) -> None:
        self._end.set()
        self._thread.join()
        if self.pid is not None:
            _signal(self.pid, signal.SIGKILL)  # the pool killed it already, or the test failed


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _states(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("select state, count(*) from trials group by state").fetchall())


def _outcomes(repo: Repository, cid: int, split: Split = Split.SEARCH) -> list[str]:
    return [a.outcome or "" for a in repo.attempts(cid) if a.split == split]


def test_job_time_limit_derives_from_finished_jobs() -> None:
    auto = JobTimeout()
    assert auto.limit(False) == auto.limit(True) == 900.0  # nothing finished yet: start-up bound
    auto.observe(False, 2.0)
    assert auto.limit(False) == 60.0 and auto.limit(True) == 900.0  # the floor; held-out still unknown
    auto.observe(False, 30.0)
    auto.observe(False, 3.0)
    assert auto.limit(False) == 150.0  # 5 x the slowest
    assert JobTimeout(7.5).limit(False) == 7.5


def test_hung_worker_is_killed_replaced_and_its_candidate_retried(
        tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path, ray_session: None) -> None:
    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a", "b")}, tiny_tasks,
                       budget={"max_trials": 10}, workers={"count": 2, "max_attempts": 2, "job_timeout_s": 15})
    controller, repo, study_id = _controller(cfg, tmp_path / "h.db")
    done = lambda: sum(1 for c in repo.candidates(study_id) if c.state == "complete") >= 2  # noqa: E731
    stopper = _Stopper(lambda: controller.pool, done)
    try:
        summary = controller.run(10, None)
    finally:
        stopper.close()
        controller.close()
    assert stopper.pid is not None and not stopper.released, "the search waited for the hung worker"
    assert summary.done == 10
    cands = repo.candidates(study_id)
    assert all(c.state == "complete" for c in cands)
    # the job that hung (ran); one queued behind it on that worker ends the same but never ran
    hung = [c for c in cands if any(a.ran and (a.outcome or "").startswith("timed out")
                                    for a in repo.attempts(c.id) if a.split == Split.SEARCH)]
    assert len(hung) == 1
    outcomes = _outcomes(repo, hung[0].id)
    assert outcomes[0] == f"timed out after 15 s on worker {_worker_name(stopper.pid)}" and outcomes[-1] == "ok"
    assert _states(tmp_path / "h.db").get("RUNNING", 0) == 0


def _worker_name(pid: int) -> str:
    import socket

    return f"{socket.gethostname()}:{pid}"


def test_search_deadline_ends_a_run_whose_worker_hangs(
        tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path, ray_session: None) -> None:
    # The per-job limit is far away: only the search's own deadline (--timeout) can end this run.
    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, tiny_tasks,
                       budget={"max_trials": 1000}, workers={"count": 1, "job_timeout_s": 3000})
    controller, repo, study_id = _controller(cfg, tmp_path / "d.db")
    # The run's clock starts when the worker hangs: the deadline then counts from there, not from a
    # start-up (Ray, the worker) whose length depends on the machine's load.
    clock = StartedClock()
    stopper = _Stopper(lambda: controller.pool, lambda: True, clock.start)  # the first job it runs hangs
    try:
        controller.run(1000, 5, grace_s=3, clock=clock)
        ended = time.monotonic()
    finally:
        stopper.close()
        controller.close()
    assert stopper.pid is not None and not stopper.released, "--timeout did not end a run with a hung worker"
    assert clock.started_at is not None
    # It waited out the deadline (5 s) and the grace past it (3 s), then no longer than slack for
    # a loaded machine.
    assert 5 + 3 <= ended - clock.started_at < 5 + 3 + 30
    cands = repo.candidates(study_id)
    assert not any(c.state == "running" for c in cands) and any(c.state == "queued" for c in cands)
    assert _states(tmp_path / "d.db").get("RUNNING", 0) == 0


def test_workers_that_cannot_restart_stop_the_search(
        tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path, ray_session: None) -> None:
    import ray

    # Sources of our own: after the first worker is up they vanish, so no replacement can load them.
    models = {k: Path(shutil.copytree(tiny_models[k], tmp_path / k)) for k in ("base", "a")}
    # A budget the killer cannot miss: the search ends at the kill; under load tiny jobs used
    # to finish all of a 40-trial budget before the killer saw a job running (DID NOT RAISE).
    cfg = write_config(tmp_path / "c.yaml", models, tiny_tasks, budget={"max_trials": 400},
                       workers={"count": 1, "max_attempts": 2})
    controller, repo, study_id = _controller(cfg, tmp_path / "r.db")
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 300
        stopped: int | None = None
        while not killed and time.monotonic() < deadline:
            pool = controller.pool
            refs = list(pool.slots[0].jobs) if pool is not None else []
            # The worker has proven it can evaluate: a job finished (read from the pool; the
            # database's session belongs to the controller's thread).
            warm = pool is not None and pool.work_s > 0
            if warm and stopped is None and refs and ray.wait(refs[:1], timeout=0)[1]:
                # Hold the running job (tiny jobs finish faster than the controller refills the
                # worker): the controller then queues a second job behind it, which never runs.
                stopped = _pid(pool, 0)
                os.kill(stopped, signal.SIGSTOP)
            if stopped is not None and len(refs) == 2:
                shutil.rmtree(models["a"])
                ray.kill(pool.slots[0].actor, no_restart=True)
                killed.append(1)
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with pytest.raises(WorkersFailing, match=r"^workers keep dying: 5 deaths in a row .*"
                                                 r"a replacement worker died while starting"):
            controller.run(400, None)
    finally:
        thread.join()
        controller.close()
    assert killed
    cands = repo.candidates(study_id)
    # The job that ran on the killed worker spent one attempt; nothing healthy was failed.
    assert not any(c.state in ("failed", "running") for c in cands)
    never_ran = [c for c in cands if any(not a.ran for a in repo.attempts(c.id) if a.split == Split.SEARCH)]
    assert never_ran and all(c.state == "queued" for c in never_ran)
    assert _states(tmp_path / "r.db").get("RUNNING", 0) == 0


def test_workers_killed_for_memory_are_named_oom(tmp_path: Path, tiny_models: dict[str, Path],
                                                 tiny_tasks: Path, ray_session: None) -> None:
    import logging

    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Ray's memory monitor kills workers while the node uses more than this fraction of its
    # memory: at 1 %, every worker it sees (the real OutOfMemoryError path, no fake).
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             _system_config={"memory_usage_threshold": 0.01, "memory_monitor_refresh_ms": 100})
    try:
        cfg = load_config(write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, tiny_tasks))
        prep = prepare(cfg)
        pool = WorkerPool(WorkerSpec(prep.folders, cfg.base_model, cfg.suite()), 1, 1, 0)
        with pytest.raises(RuntimeError, match=r"^a worker failed to start: out of memory \(OOM\): "):
            pool.wait_ready()
    finally:
        ray.shutdown()
    # Ray's generic death message lists the OOM killer among possible causes: not a diagnosis.
    assert not _cause(ray.exceptions.ActorDiedError()).startswith("out of memory")


def test_heldout_crashes_are_counted_and_never_ran_jobs_retried(
        tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path, ray_session: None) -> None:
    import ray

    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, tiny_tasks,
                       budget={"max_trials": 6}, workers={"count": 1, "max_attempts": 1})
    controller, repo, study_id = _controller(cfg, tmp_path / "o.db")
    killed: list[int] = []
    try:
        controller.run(6, None)

        def killer() -> None:
            deadline = time.monotonic() + 300
            while not killed and time.monotonic() < deadline:
                pool = controller.pool
                refs = list(pool.slots[0].jobs) if pool is not None else []
                # Two held-out jobs on the worker, the first still running: kill it.
                if len(refs) == 2 and ray.wait(refs[:1], timeout=0)[1]:
                    ray.kill(pool.slots[0].actor, no_restart=True)
                    killed.append(1)
                time.sleep(0.01)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        scored = controller.rescore_heldout()
        thread.join()
    finally:
        controller.close()
    assert killed
    chosen = [c for c in repo.candidates(study_id) if _outcomes(repo, c.id, Split.HELDOUT)]
    assert len(controller.heldout_failed) == 1 and scored == len(chosen) - 1
    (reason,) = controller.heldout_failed.values()
    assert reason.startswith("worker died")
    retried = [c for c in chosen if any(not a.ran for a in repo.attempts(c.id) if a.split == Split.HELDOUT)]
    assert retried and all(c.heldout is not None for c in retried)
