"""PS+DFS end to end on the demo models, with real Ray, lm-eval and SQLite: a PS study, then a
DFS study over the PS model and the experts, one leaderboard, and the replay of a route."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.test_search_e2e import demo_config, evomerge, query, start_and_wait_for_progress

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray


@pytest.fixture(scope="module")
def ps_dfs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("psdfs")
    cfg = demo_config(tmp / "psdfs.yaml", max_trials=10, limit=24, space="ps+dfs",
                      dfs={"repeats": 2, "max_trials": 14, "max_hops": 5})
    proc = evomerge("search", str(cfg), "--storage", f"sqlite:///{tmp / 'r.db'}", "--workers", "2", cwd=tmp)
    (tmp / "search.out").write_text(proc.stdout)
    return tmp, tmp / "r.db"


def test_both_stages_are_recorded_in_one_storage(ps_dfs: tuple[Path, Path]) -> None:
    _, db = ps_dfs
    studies = dict(query(db, "select name, id from evomerge_studies"))
    assert set(studies) == {"t", "t:dfs"}
    rows = query(db, f"select recipe_json, state, origin, error from evomerge_candidates where study_id={studies['t:dfs']}")
    assert len([r for r in rows if r[1] in ("complete", "failed")]) == 14
    recipes = [json.loads(r[0]) for r in rows]
    routes = [r for r in recipes if r["kind"] == "route"]
    assert routes and all(r["models"] == ["ps", "cipher_a", "cipher_b"] and "ps" in r["members"] for r in routes)
    ps_best = query(db, f"select recipe_json from evomerge_candidates where study_id={studies['t']} and "
                        "state='complete' order by fitness desc, id asc limit 1")[0][0]
    assert all(json.loads(ps_best)["params"] == r["members"]["ps"]["params"] for r in routes)
    # Too-long paths were refused before evaluation, with their reason recorded (the start is
    # model A's 4 layers; most proposals switch on more than one further slot).
    long = [(state, error) for recipe, state, _, error in rows if len(json.loads(recipe).get("route", [])) > 5]
    assert long and all(state == "failed" and "exceeds dfs.max_hops 5" in error for state, error in long)


def test_one_leaderboard_shows_paths_and_both_stages(ps_dfs: tuple[Path, Path]) -> None:
    tmp, db = ps_dfs
    out = evomerge("status", "--storage", f"sqlite:///{db}", cwd=tmp).stdout
    assert "ps:source" in out and "dfs:" in out and "route of" in out and "A0" in out
    # the search itself ends with the same board over both stages, totals included
    searched = (tmp / "search.out").read_text()
    assert searched.splitlines()[0] == out.splitlines()[0] and "ps:source" in searched and "dfs:cma" in searched
    board = json.loads(evomerge("status", "--storage", f"sqlite:///{db}", "--json", cwd=tmp).stdout)
    origins = {r["origin"].split(":")[0] for r in board["rows"] + board["baselines"]}
    assert origins == {"ps", "dfs"} and any(r["heldout"] for r in board["rows"] if r["origin"].startswith("dfs"))


def test_replay_of_the_best_route_is_an_ordinary_model(ps_dfs: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM

    tmp, db = ps_dfs
    trial, recipe_json = query(db, "select c.trial_number, c.recipe_json from evomerge_candidates c join "
                                   "evomerge_studies s on s.id=c.study_id where s.name='t:dfs' and c.state="
                                   "'complete' and c.origin='cma' order by c.fitness desc limit 1")[0]
    out = tmp / "route-model"
    evomerge("replay", "--storage", f"sqlite:///{db}", "--study", "t:dfs", "--trial", str(trial),
             "--out", str(out), cwd=tmp)
    recipe = json.loads(recipe_json)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert model.config.num_hidden_layers == len(recipe["route"])
    assert json.loads((out / "evomerge_recipe.json").read_text())["route"] == recipe["route"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_kill_9_during_the_dfs_stage_then_resume(tmp_path: Path) -> None:
    """The controller dies mid-DFS; the same command resumes the DFS study (the finished PS
    stage is not extended, its best stays the route's member) and completes every candidate."""
    cfg = demo_config(tmp_path / "k.yaml", max_trials=8, limit=24, space="ps+dfs",
                      dfs={"repeats": 2, "max_trials": 30})
    db = tmp_path / "k.db"
    proc = start_and_wait_for_progress(cfg, db, tmp_path, study="t:dfs", done_at_least=6)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    studies = dict(query(db, "select name, id from evomerge_studies"))
    ps_rows = query(db, f"select id, state from evomerge_candidates where study_id={studies['t']} order by id")
    interrupted = {i for (i,) in query(db, "select id from evomerge_candidates where state='running' "
                                           f"and study_id={studies['t:dfs']}")}
    assert interrupted and all(state in ("complete", "failed") for _, state in ps_rows)

    evomerge("search", str(cfg), "--storage", f"sqlite:///{db}", "--workers", "2", cwd=tmp_path)
    assert query(db, "select count(*) from trials where state='RUNNING'") == [(0,)]
    assert query(db, f"select id, state from evomerge_candidates where study_id={studies['t']} order by id") == ps_rows
    dfs = query(db, f"select id, state, attempt, recipe_json from evomerge_candidates where study_id={studies['t:dfs']}")
    assert sorted({state for _, state, _, _ in dfs}) <= ["complete", "failed"] and len(dfs) == 30
    assert all(state == "complete" and attempt == 2 for i, state, attempt, _ in dfs if i in interrupted)
    ps_best = json.loads(query(db, f"select recipe_json from evomerge_candidates where study_id={studies['t']} and "
                                   "state='complete' order by fitness desc, id asc limit 1")[0][0])
    routes = [json.loads(r) for *_, r in dfs if json.loads(r)["kind"] == "route"]
    assert routes and all(r["members"]["ps"]["params"] == ps_best["params"] for r in routes)
