"""SIGTERM (what batch schedulers send) and SIGINT stop a real search in order: exit 128 + the
signal, work in flight re-queued, the lease released, nothing RUNNING, no attempt left open,
during the search and during the held-out re-scoring alike."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.cli_fork import Running
from tests.helpers import start_evomerge

from tests.test_search_e2e import (assert_stopped_in_order, demo_config, evomerge, query, stop_in_order,
                                   stop_mid_search)

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray


def test_sigterm_stops_the_search_in_order(tmp_path: Path) -> None:
    """Before: exit 134 "Aborted" with a C stack line (Ray's failure handler took SIGTERM over)."""
    err = stop_mid_search(tmp_path, signal.SIGTERM)
    assert b"terminated (SIGTERM)" in err and b"Aborted" not in err


def start_and_wait_for_heldout(cfg: Path, db: Path, cwd: Path) -> Running:
    """A search in a process of its own, returned once a held-out re-score is in flight."""
    proc = start_evomerge("search", str(cfg), "--storage", f"sqlite:///{db}", "--workers", "2", cwd=cwd)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        try:
            if query(db, "select count(*) from evomerge_attempts where split='heldout' and ended_at is null")[0][0]:
                return proc
        except Exception:
            continue  # no database or tables yet
    proc.kill()
    pytest.fail(f"no held-out re-score seen (exit {proc.poll()})")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_heldout_rescoring_leaves_no_open_attempt(tmp_path: Path, signum: int) -> None:
    """Before: SIGTERM left held-out attempt rows open forever (and SIGINT took no lease)."""
    cfg = demo_config(tmp_path / "h.yaml", max_trials=6, limit=100)
    db = tmp_path / "h.db"
    stop_in_order(start_and_wait_for_heldout(cfg, db, tmp_path), db, signum)
    # The same command finishes the re-scoring.
    evomerge("search", str(cfg), "--storage", f"sqlite:///{db}", "--workers", "2", cwd=tmp_path)
    assert_stopped_in_order(db)
    baselines = query(db, "select heldout_fitness from evomerge_candidates where origin in ('source', 'untuned')")
    assert baselines and all(h is not None for (h,) in baselines)
