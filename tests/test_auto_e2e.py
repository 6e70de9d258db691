"""A default search (no method, no granularity: both auto) through the real path: every family
gets its first generation from its untuned merge, the budget goes to the leaders, the records
are ordinary recipes of one method, and ``kill -9`` of the controller resumes the allocation."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from evomerge.search.families import families
from tests.test_search_e2e import demo_config, evomerge, query, rebuilt_proposal, start_and_wait_for_progress

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray


def test_auto_searches_every_family_and_resumes_after_kill_9(tmp_path: Path) -> None:
    budget = 40
    cfg = demo_config(tmp_path / "a.yaml", max_trials=budget, limit=20, merge={}, optimizer={"popsize": 3})
    db = tmp_path / "a.db"
    proc = start_and_wait_for_progress(cfg, db, tmp_path, done_at_least=16)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)

    first = rebuilt_proposal(cfg, db)
    assert rebuilt_proposal(cfg, db) == first  # the allocation is a function of what was stored

    evomerge("search", str(cfg), "--storage", f"sqlite:///{db}", "--workers", "2", cwd=tmp_path)
    rows = query(db, "select origin, state, recipe_json from evomerge_candidates order by id")
    assert len(rows) == budget and all(state in ("complete", "failed") for _, state, _ in rows)
    evolved = Counter(json.loads(r)["method"] for origin, _, r in rows if origin == "cma")
    auto = families("auto", 2)
    searchable = [f for f in auto if f != "model_stock"]
    # every searchable family had its first generation (3) before any was dropped
    assert set(evolved) <= set(auto) and all(evolved[f] >= 3 for f in searchable), evolved
    untuned = {json.loads(r)["method"] for origin, _, r in rows if origin == "untuned"}
    assert untuned == {"linear", *auto}  # the soup and every family's untuned merge
    attr = query(db, "select value_json from study_user_attributes where key = 'optimizer'")
    assert attr and "auto (cma per arm)" in json.loads(attr[0][0])
    status = evomerge("status", "--storage", f"sqlite:///{db}", cwd=tmp_path).stdout
    assert "evaluations per merge family:" in status
    board = json.loads(evomerge("status", "--storage", f"sqlite:///{db}", "--json", cwd=tmp_path).stdout)
    spent = {f["family"]: f["evaluations"] for f in board["families"]}
    assert 0 < sum(spent.values()) <= sum(evolved.values())  # duplicates of a twin are not counted
    best = max(spent, key=spent.__getitem__)
    assert spent[best] > 2, "the budget went somewhere"
