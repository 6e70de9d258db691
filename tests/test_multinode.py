"""A search over a real two-node Ray cluster, and one node killed in the middle of it.

Both nodes run on this machine, started the way docs/cluster.md says (``ray start --head``,
then ``ray start --address`` on the other node) with token authentication, each on its own
loopback address (127.0.0.2 and 127.0.0.3: Ray replaces 127.0.0.1 by the host's address,
the rest of 127/8 it keeps). Each node offers one CPU, so each of the two workers lives on
its own node. Killing a node's whole process group (raylet, agents, its worker) with
SIGKILL is a machine dying: its job in flight must be retried elsewhere and nothing lost.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ray_nodes import RAY, Node, free_port, new_token, node_env, port_open, ray_temp_dir, wait_for
from tests.test_search_e2e import demo_config

# Enough work (and every document of the demo's tasks per candidate) that the second node's
# worker, which starts later under load, still has search jobs queued when it dies.
TRIALS = 40


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], Node, Node]]:
    env = node_env(new_token(tmp_path))
    port = free_port("127.0.0.2")
    temp = ray_temp_dir()
    head = Node(["--head", "--node-ip-address=127.0.0.2", f"--port={port}", "--include-dashboard=false",
                 f"--temp-dir={temp}"], env, tmp_path / "head.log")
    nodes = [head]
    try:
        wait_for("the Ray head", lambda: port_open("127.0.0.2", port) or head.proc.poll() is not None)
        assert head.proc.poll() is None, head.log.read_text()[-2000:]
        other = Node([f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.3"], env, tmp_path / "node.log")
        nodes.append(other)

        def two_nodes() -> bool:
            out = subprocess.run([RAY, "status", f"--address=127.0.0.2:{port}"], env=env, capture_output=True,
                                 text=True, timeout=60).stdout
            return out.count(" node_") >= 2

        wait_for("the second node to join", two_nodes, every=3.0)
        yield f"127.0.0.2:{port}", env, head, other
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _attempts(db: Path) -> list[tuple[int, int, str, str | None, float | None, str | None]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return conn.execute("SELECT candidate_id, attempt, split, worker, ended_at, outcome "
                                "FROM evomerge_attempts ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []


def _pid(worker: str | None) -> int:
    return int((worker or "0").rpartition(":")[2])


def test_search_spans_two_nodes_and_loses_nothing_when_one_dies(
        tmp_path: Path, cluster: tuple[str, dict[str, str], Node, Node]) -> None:
    address, env, head, other = cluster
    cfg = demo_config(tmp_path / "cfg.yaml", TRIALS, limit=200)
    db = tmp_path / "s.db"
    log = tmp_path / "search.log"
    search = subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(cfg), "--storage", f"sqlite:///{db}",
                               "--ray-address", address, "--workers", "2"], cwd=tmp_path, env=env,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        # Both nodes do work: one finished search job on each, then the second node dies at once
        # (each worker holds up to two jobs, so it has one in flight; a held-out job would
        # mean the search's trials were all dispatched already).
        def on_both() -> list[str]:
            done = [worker for _, _, split, worker, ended, outcome in _attempts(db)
                    if ended and outcome == "ok" and worker and split == "search"]
            heads = [w for w in done if head.owns(_pid(w))]
            others = [w for w in done if other.owns(_pid(w))]
            return [heads[0], others[0]] if heads and others else []

        head_worker, lost_worker = wait_for("a finished job on each node", on_both, timeout=420)
        other.kill()
        assert search.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if search.poll() is None:
            search.kill()
    rows = _attempts(db)
    with sqlite3.connect(db) as conn:
        failed_trials = conn.execute(
            "SELECT a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
            "WHERE t.state != 'COMPLETE' AND a.key = 'fail_reason'").fetchall()
        unfinished = conn.execute("SELECT COUNT(*) FROM trials WHERE state NOT IN ('COMPLETE', 'FAIL')").fetchone()[0]
        scored = conn.execute("SELECT COUNT(*) FROM evomerge_candidates WHERE fitness IS NOT NULL").fetchone()[0]
        candidates = dict(conn.execute("SELECT state, COUNT(*) FROM evomerge_candidates GROUP BY state").fetchall())
    # Nothing open, nothing lost: every candidate of the budget completed with a score; the
    # only failed Optuna trials are the lost attempts, each re-queued (one trial per attempt).
    assert all(ended is not None for *_, ended, _ in rows)
    assert unfinished == 0
    assert failed_trials and all("re-queued" in reason for (reason,) in failed_trials), failed_trials
    assert set(candidates) == {"complete"}, candidates
    assert scored >= TRIALS
    # The job that was on the dead node ended with the worker's loss and ran again, elsewhere.
    lost = [(cid, n) for cid, n, split, worker, _, outcome in rows if worker == lost_worker and outcome != "ok"]
    assert lost, f"no job of the killed node's worker {lost_worker} was in flight: {rows[-6:]}"
    for cid, n in lost:
        later = [r for r in rows if r[0] == cid and r[1] > n]
        assert later and later[-1][5] == "ok", (cid, rows)
        assert all(not other.owns(_pid(r[3])) for r in later)
    assert head_worker != lost_worker


def test_a_search_without_ray_address_never_joins_another_cluster(tmp_path: Path) -> None:
    """A dead cluster named by RAY_ADDRESS (as by the address file a `ray start --head` leaves
    in /tmp/ray) is ignored: without --ray-address the search starts its own Ray on loopback
    (it used to try to join and fail: "num_cpus and num_gpus must not be provided")."""
    cfg = demo_config(tmp_path / "cfg.yaml", 3, limit=10)
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.9:{free_port('127.0.0.1')}"}
    env.pop("EVOMERGE_RAY_ADDRESS", None)  # neither the flag nor its variable: a Ray of its own
    proc = subprocess.run([sys.executable, "-m", "evomerge", "search", str(cfg), "--storage",
                           f"sqlite:///{tmp_path / 's.db'}", "--workers", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
