"""The controller lease: one winner per race of real processes (SQLite and PostgreSQL), a
paused controller fenced at its next write, the held-out phase under the lease too."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from evomerge.storage.kinds import Origin, Split, State
from evomerge.storage.repository import LeaseError, LeaseLost, Repository
from tests.clocks import SteppedClock
from tests.helpers import cli_env

PG_URL = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")

# Each racer takes part in every round: at the round's instant, it tries to take the lease
# of that round's study, and prints the rounds it won. It says "ready" once it has imported
# and connected, and reads the first round's instant from its stdin.
RACER = """
import sys, time
from evomerge.storage.repository import LeaseError, Repository
url, me, ids = sys.argv[1], sys.argv[2], sys.argv[3]
repo = Repository(url)
repo.study_names()  # connected
print("ready", flush=True)
start = float(sys.stdin.readline())
won = []
for r, study_id in enumerate(int(i) for i in ids.split(",")):
    time.sleep(max(0.0, start + 0.4 * r - time.time()))
    try:
        repo.acquire_lease(study_id, me, 600.0, lambda owner: True)
        won.append(r)
    except LeaseError:
        pass
print(" ".join(map(str, won)))
"""


def race(url: str, racers: int = 6, rounds: int = 15) -> list[int]:
    """Winners per round of ``racers`` processes racing for a fresh study's lease."""
    repo = Repository(url)
    prefix = uuid.uuid4().hex[:8]
    ids = [repo.create_study(f"race-{prefix}-{r}", "{}").id for r in range(rounds)]
    repo.close()
    env = cli_env()
    procs = [subprocess.Popen([sys.executable, "-c", RACER, url, f"racer:{i}", ",".join(map(str, ids))], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(racers)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n", proc.communicate()[1][-2000:]
    start = time.time() + 0.5  # all are ready: the first round need not wait for imports
    wins = [0] * rounds
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{start}\n")
        proc.stdin.flush()  # communicate() closes it
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        for r in out.split():
            wins[int(r)] += 1
    return wins


def test_one_winner_per_lease_race_on_sqlite(tmp_path: Path) -> None:
    # Before: SQLite ignored SELECT ... FOR UPDATE and both processes won in most races.
    assert race(f"sqlite:///{tmp_path / 'race.db'}") == [1] * 15


@pytest.mark.skipif(not PG_URL, reason="EVOMERGE_TEST_POSTGRES_URL not set (see .ci/postgres.sh)")
def test_one_winner_per_lease_race_on_postgres() -> None:
    assert PG_URL is not None
    assert race(PG_URL) == [1] * 15


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_controller_paused_past_its_lease_is_fenced(tmp_path: Path, backend: str) -> None:
    """A controller whose lease expired while it was paused, and was taken by another, writes
    nothing more: its next write raises LeaseLost (one line) and leaves the table untouched.
    The pause is a clock both controllers read, moved past the lease (no real waiting)."""
    if backend == "postgresql" and not PG_URL:
        pytest.skip("EVOMERGE_TEST_POSTGRES_URL not set (see .ci/postgres.sh)")
    url = PG_URL if backend == "postgresql" else f"sqlite:///{tmp_path / 'f.db'}"
    assert url is not None
    clock = SteppedClock()
    paused, other = Repository(url, clock=clock), Repository(url, clock=clock)  # two controllers, two connections
    study = paused.create_study(f"fence-{uuid.uuid4().hex[:8]}", "{}")
    paused.acquire_lease(study.id, "host:1", 120.0, lambda owner: True)
    first = paused.add_candidate(study.id, "{}", "h1", Origin.SOURCE)  # writes while the lease holds
    with pytest.raises(LeaseError):
        other.acquire_lease(study.id, "host:2", 60.0, lambda owner: True)
    clock.advance(121.0)  # "paused" past its lease
    other.acquire_lease(study.id, "host:2", 600.0, lambda owner: True)
    with pytest.raises(LeaseLost, match=r"lost the lease .* \(now held by host:2\)"):
        paused.add_candidate(study.id, "{}", "h2", Origin.SOURCE)
    with pytest.raises(LeaseLost):
        paused.complete(first, scores={"t": 1.0}, fitness=1.0, worker="w", materialize_s=0.1, evaluate_s=0.1)
    with pytest.raises(LeaseLost):
        paused.renew_lease(study.id, "host:1", 60.0)
    with pytest.raises(LeaseLost):
        paused.check_lease()
    assert [c.recipe_hash for c in other.candidates(study.id)] == ["h1"]
    assert other.candidate(first).state == State.QUEUED
    # The new holder keeps writing, and a paused one that nobody displaced simply goes on.
    other.add_candidate(study.id, "{}", "h3", Origin.SOURCE)
    other.release_lease(study.id, "host:2")
    paused.acquire_lease(study.id, "host:1", 120.0, lambda owner: True)
    clock.advance(121.0)
    paused.add_candidate(study.id, "{}", "h4", Origin.SOURCE)  # expired, but nobody took it: still ours
    assert len(other.candidates(study.id)) == 3
    paused.close()
    other.close()


def test_a_lease_expires_by_the_clock_and_writes_renew_it(tmp_path: Path) -> None:
    """The lease's expiry is the injected clock's: a holder that writes keeps it (each write
    extends it), and one that stops writing loses it to the next controller after its 120 s."""
    clock = SteppedClock()
    holder, other = Repository(f"sqlite:///{tmp_path / 'e.db'}", clock=clock), Repository(
        f"sqlite:///{tmp_path / 'e.db'}", clock=clock)
    study = holder.create_study("e", "{}")
    holder.acquire_lease(study.id, "host:1", 120.0, lambda owner: True)
    for _ in range(5):  # 5 x 100 s, a write each: never 120 s without one
        clock.advance(100.0)
        holder.add_candidate(study.id, "{}", "h", Origin.SOURCE)
        with pytest.raises(LeaseError, match="driven by controller host:1"):
            other.acquire_lease(study.id, "host:2", 120.0, lambda owner: True)
    clock.advance(119.0)
    with pytest.raises(LeaseError):
        other.acquire_lease(study.id, "host:2", 120.0, lambda owner: True)
    clock.advance(2.0)
    other.acquire_lease(study.id, "host:2", 120.0, lambda owner: True)
    with pytest.raises(LeaseLost):
        holder.check_lease()


def test_dead_holder_is_taken_over_but_a_live_one_is_not(tmp_path: Path) -> None:
    repo = Repository(f"sqlite:///{tmp_path / 'd.db'}", clock=SteppedClock())
    study = repo.create_study("d", "{}")
    repo.acquire_lease(study.id, "host:dead", 600.0, lambda owner: True)
    repo.drop_fence()
    with pytest.raises(LeaseError, match="driven by controller host:dead"):
        repo.acquire_lease(study.id, "host:me", 600.0, lambda owner: True)
    repo.acquire_lease(study.id, "host:me", 600.0, lambda owner: owner != "host:dead")
    assert repo.holds_lease


def test_heldout_rescoring_runs_under_the_lease(tmp_path: Path, tiny_models: dict[str, Path],
                                                tiny_tasks: Path) -> None:
    """Before: the held-out phase took no lease, so a second controller re-scored the same
    candidates (12 held-out trials instead of 8)."""
    import ray

    from tests.test_failures import _controller
    from tests.helpers import write_config

    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a", "b")}, tiny_tasks,
                       budget={"max_trials": 6})
    controller, repo, study_id = _controller(cfg, tmp_path / "h.db")
    try:
        controller.run(6, None)
        # Another live controller (on this host: the parent process's pid) holds the study now.
        holder = f"{socket.gethostname()}:{os.getppid()}"
        other = Repository(f"sqlite:///{tmp_path / 'h.db'}")
        other.acquire_lease(study_id, holder, 600.0, lambda owner: True)
        with pytest.raises(LeaseError):
            controller.rescore_heldout()
        assert all(a.split != Split.HELDOUT for c in repo.candidates(study_id) for a in repo.attempts(c.id))
        other.release_lease(study_id, holder)
        assert controller.rescore_heldout() >= 1
        attempts = [a for c in repo.candidates(study_id) for a in repo.attempts(c.id) if a.split == Split.HELDOUT]
        assert attempts and all(a.outcome is not None and a.ended_at is not None for a in attempts)
    finally:
        controller.close()
        ray.shutdown()
