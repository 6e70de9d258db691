"""A multi-objective search (NSGA-II, one objective per task) on the demo: a Pareto front in
``status``, in optuna-dashboard, and any member replayed scores as stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.search.app.leaderboard import pareto_front
from evomerge.search.config import SearchConfig
from evomerge.search.origins import evolved
from evomerge.storage.repository import Repository
from tests.test_search_e2e import TASKS, demo_config, evomerge, query, served_dashboard

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray


@pytest.fixture(scope="module")
def front_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("mo")
    cfg = demo_config(tmp / "mo.yaml", max_trials=24, limit=40, optimizer={"name": "nsga2", "popsize": 6})
    evomerge("search", str(cfg), "--storage", f"sqlite:///{tmp / 'mo.db'}", "--workers", "2", cwd=tmp)
    return tmp, tmp / "mo.db"


def test_status_shows_the_pareto_front(front_study: tuple[Path, Path]) -> None:
    tmp, db = front_study
    out = json.loads(evomerge("status", "--storage", f"sqlite:///{db}", "--json", cwd=tmp).stdout)
    front = out["front"]
    assert len(front) >= 3 and out["optimizer"].startswith("nsga2")
    # Non-dominated: no member beats another on every task.
    vectors = [tuple(r["scores"][t] for t in TASKS) for r in front]
    for a in vectors:
        assert not any(all(x >= y for x, y in zip(b, a)) and b != a for b in vectors)
    text = evomerge("status", "--storage", f"sqlite:///{db}", cwd=tmp).stdout
    assert f"Pareto front over the tasks ({len(front)} non-dominated" in text
    # The Optuna study is multi-objective, named by task: the dashboard plots its front.
    assert query(db, "select count(*) from study_directions d join studies s on s.study_id = d.study_id "
                     "where s.study_name = 't'") == [(len(TASKS),)]


def test_dashboard_shows_the_front(front_study: tuple[Path, Path]) -> None:
    tmp, db = front_study
    with served_dashboard(db, tmp) as get:
        summaries = json.loads(get("/api/studies"))["study_summaries"]
        study_id = {s["study_name"]: s["study_id"] for s in summaries}["t"]
        study = json.loads(get(f"/api/studies/{study_id}?after=0"))
    assert len(study["directions"]) == len(TASKS) and study["objective_names"] == list(TASKS)
    assert len(study["best_trials"]) >= 3  # optuna-dashboard's Pareto front
    assert any(a["key"] == "optimizer" and a["value"].startswith("nsga2") for a in study["user_attrs"])


def test_replay_of_a_front_member_scores_as_stored(front_study: tuple[Path, Path]) -> None:
    tmp, db = front_study
    repo = Repository(f"sqlite:///{db}")
    record = repo.get_study("t")
    assert record is not None
    members = [c for c in pareto_front(repo.candidates(record.id), TASKS) if evolved(c)]
    assert members, "the front holds no evolved recipe"
    member = members[-1]  # not the best by fitness: any member replays
    out = tmp / "member"
    evomerge("replay", "--storage", f"sqlite:///{db}", "--trial", str(member.trial_number), "--out", str(out), cwd=tmp)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluators.harness import Evaluator

    cfg = SearchConfig.model_validate_json(record.config_json)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert Evaluator(cfg.suite(), model, tokenizer, batch_size=64).score() == pytest.approx(member.scores, abs=1e-9)
