"""The whole service as a user runs it: search -> status -> replay -> resume, with real
Ray, real lm-eval and real SQLite, on the shipped demo models."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.cli_fork import Running
from tests.helpers import DEMO, cli_env, run_evomerge, start_evomerge, write_config

DEMO_MODELS = {"base": DEMO / "models" / "base", "cipher_a": DEMO / "models" / "cipher_a",
               "cipher_b": DEMO / "models" / "cipher_b"}

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray
TASKS = ("cipher_a", "cipher_b", "cipher_mix")


def demo_config(path: Path, max_trials: int, limit: int = 40, **overrides: object) -> Path:
    cfg = write_config(path, DEMO_MODELS, DEMO / "tasks", budget={"max_trials": max_trials}, **overrides)
    import yaml

    data = yaml.safe_load(cfg.read_text())
    data["evaluation"]["tasks"] = [{"name": t} for t in TASKS]
    data["evaluation"]["limit"] = limit
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def evomerge(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = run_evomerge(*args, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def query(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = demo_config(tmp / "search.yaml", max_trials=13)
    evomerge("search", str(cfg), "--storage", f"sqlite:///{tmp / 's.db'}", "--workers", "2", cwd=tmp)
    return tmp, tmp / "s.db"


def test_search_records_every_trial(searched: tuple[Path, Path]) -> None:
    _, db = searched
    states = query(db, "select state, count(*) from evomerge_candidates group by state")
    assert dict(states) == {"complete": 13}
    origins = [o for (o,) in query(db, "select origin from evomerge_candidates order by id")]
    assert origins[:5] == ["source"] * 3 + ["untuned"] * 2 and set(origins[5:]) == {"cma"}
    trials = query(db, "select t.state, count(*) from trials t join studies s using(study_id) "
                       "where s.study_name = 't' group by t.state")
    assert dict(trials) == {"COMPLETE": 13}
    # Each CMA generation told exactly popsize (4) candidates, in order, all of them CMA ones.
    gens = query(db, "select \"index\", candidate_ids_json from evomerge_generations order by \"index\"")
    assert [g for g, _ in gens] == list(range(len(gens))) and len(gens) >= 1
    cma_ids = {i for (i,) in query(db, "select id from evomerge_candidates where origin = 'cma'")}
    for _, ids in gens:
        assert len(json.loads(ids)) == 4 and set(json.loads(ids)) <= cma_ids
    # Timings, worker and attempt are recorded; identical recipes share no evaluation twice.
    rows = query(db, "select materialize_s, evaluate_s, worker, attempt from evomerge_candidates")
    assert all(m is not None and e > 0 and w and a == 1 for m, e, w, a in rows)
    hashes = [h for (h,) in query(db, "select recipe_hash from evomerge_candidates where duplicate_of is null")]
    assert len(hashes) == len(set(hashes))


def test_status_shows_leaderboard_with_heldout(searched: tuple[Path, Path]) -> None:
    tmp, db = searched
    board = json.loads(evomerge("status", "--storage", f"sqlite:///{db}", "--json", cwd=tmp).stdout)
    assert board["done"] == 13 and board["failed"] == 0
    assert {r["origin"] for r in board["rows"]} == {"cma"}  # baselines have their own section
    assert {r["origin"] for r in board["baselines"]} == {"source", "untuned"}
    assert [r["rank"] for r in board["rows"]] == list(range(1, len(board["rows"]) + 1))
    assert all(r["rank"] is None for r in board["baselines"])
    fitness = [r["fitness"] for r in board["rows"]]
    assert fitness == sorted(fitness, reverse=True)
    # Structured recipes and genes, not display strings.
    assert all(r["recipe"]["kind"] == "merge" and len(r["genes"]) == 4 for r in board["rows"])
    heldout = [r for r in board["rows"] + board["baselines"] if r["heldout"] is not None]
    # Every baseline and the top-2 evolved candidates were re-scored on the held-out split.
    assert sum(r["origin"] != "cma" for r in heldout) == 5 and sum(r["origin"] == "cma" for r in heldout) == 2
    text = evomerge("status", "--storage", f"sqlite:///{db}", cwd=tmp).stdout
    assert "cipher_mix" in text and "source cipher_a" in text and "baselines (" in text
    assert max(len(line) for line in text.splitlines()) <= 120
    # One number per candidate: the board's trial number is the one replay takes.
    assert f"{board['rows'][0]['trial']}" in text.splitlines()[6]


def test_replay_loads_and_scores_the_same(searched: tuple[Path, Path]) -> None:
    tmp, db = searched
    out = tmp / "best"
    evomerge("replay", "--storage", f"sqlite:///{db}", "--out", str(out), cwd=tmp)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluators.harness import Evaluator
    from evomerge.search.config import SearchConfig

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    (config_json,) = query(db, "select config_json from evomerge_studies")[0]
    cfg = SearchConfig.model_validate_json(config_json)
    best_scores, best_fit = query(db, "select scores_json, fitness from evomerge_candidates "
                                      "where state='complete' order by fitness desc, id asc limit 1")[0]
    scores = Evaluator(cfg.suite(), model, tokenizer, batch_size=64).score()
    assert scores == pytest.approx(json.loads(best_scores), abs=1e-9)
    card = (out / "README.md").read_text()
    assert f"{best_fit:.4f}" in card and '"method"' in card
    # A second replay of the same recipe is byte-identical.
    out2 = tmp / "best2"
    evomerge("replay", "--storage", f"sqlite:///{db}", "--out", str(out2), cwd=tmp)
    for file in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (out / file).read_bytes() == (out2 / file).read_bytes(), file
        assert (out / file).stat().st_mode & 0o777 == 0o644
    assert not list(tmp.glob(".best*.partial-*"))  # no temporary folder left behind


def test_replay_writes_the_mergekit_config_of_the_best(searched: tuple[Path, Path]) -> None:
    """--mergekit-yaml alone writes mergekit's config of the best recipe; read back, it is the
    same recipe (mergekit itself merges it: tests/test_mergekit_parity.py)."""
    from evomerge.workers.mergekit import from_mergekit

    tmp, db = searched
    path = tmp / "best-mergekit.yaml"
    trial, recipe_json = query(db, "select trial_number, recipe_json from evomerge_candidates where "
                                   "state='complete' and origin='cma' order by fitness desc, id asc limit 1")[0]
    evomerge("replay", "--storage", f"sqlite:///{db}", "--trial", str(trial), "--mergekit-yaml", str(path), cwd=tmp)
    text = path.read_text()
    assert "merge_method: dare_ties" in text and "random masks" in text  # the RNG caveat is stated
    from evomerge.workers.recipe import parse_recipe

    best = parse_recipe(recipe_json)
    back = from_mergekit(yaml.safe_load(text), tmp).recipe
    assert back.params == best.params and back.shared == best.shared and back.normalize == best.normalize


def test_rerun_resumes_and_counts_budget(searched: tuple[Path, Path]) -> None:
    tmp, db = searched
    cfg = tmp / "search.yaml"
    evomerge("search", str(cfg), "--storage", f"sqlite:///{db}", "--max-trials", "17", cwd=tmp)
    assert query(db, "select count(*) from evomerge_candidates where state='complete'") == [(17,)]
    # A changed study definition is refused, not mixed in.
    import yaml

    data = yaml.safe_load(cfg.read_text())
    data["merge"]["method"] = "ties"
    other = tmp / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    proc = run_evomerge("search", str(other), "--storage", f"sqlite:///{db}", cwd=tmp, timeout=300)
    assert proc.returncode == 2 and "different config" in proc.stderr


def start_and_wait_for_progress(cfg: Path, db: Path, cwd: Path, study: str = "t",
                                done_at_least: int = 12) -> Running:
    """A search in a process of its own, returned once some of ``study``'s candidates are done and
    some running."""
    proc = start_evomerge("search", str(cfg), "--storage", f"sqlite:///{db}", "--workers", "2", cwd=cwd)
    count = ("select count(*) from evomerge_candidates c join evomerge_studies s on s.id = c.study_id "
             f"where s.name = '{study}' and c.state = ")
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.2)
        if not db.exists():
            continue
        try:
            done = query(db, count + "'complete'")[0][0]
            running = query(db, count + "'running'")[0][0]
        except sqlite3.OperationalError:
            continue  # tables not created yet
        if done >= done_at_least and running >= 1:
            return proc
    proc.kill()
    pytest.fail("search made no progress")


def assert_stopped_in_order(db: Path) -> None:
    """Nothing RUNNING in either ledger, no attempt left open, the lease released."""
    assert query(db, "select count(*) from evomerge_candidates where state='running'") == [(0,)]
    assert query(db, "select count(*) from trials where state='RUNNING'") == [(0,)]
    assert query(db, "select count(*) from evomerge_attempts where ended_at is null") == [(0,)]
    assert query(db, "select lease_owner, lease_until from evomerge_studies") == [(None, None)]


def stop_in_order(proc: Running, db: Path, signum: int) -> bytes:
    """Signal a search; it must stop in order, with exit status 128 + signum. Returns its stderr."""
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signum, err.decode()[-3000:]
    assert b"resumes with the same command" in err and b"Traceback" not in err
    assert_stopped_in_order(db)
    return err


def stop_mid_search(tmp_path: Path, signum: int) -> bytes:
    """Signal a search that is in full swing: it stops in order and re-queues its work in flight."""
    cfg = demo_config(tmp_path / "i.yaml", max_trials=40, limit=100)
    db = tmp_path / "i.db"
    err = stop_in_order(start_and_wait_for_progress(cfg, db, tmp_path), db, signum)
    assert query(db, "select count(*) from evomerge_candidates where state='queued'")[0][0] >= 1
    return err


def test_ctrl_c_requeues_in_flight_work(tmp_path: Path) -> None:
    """Must hold on a loaded machine: before, a SIGINT landing inside a Ray or SQL call (or the
    cleanup after it) could turn into another exception and exit 1."""
    stop_mid_search(tmp_path, signal.SIGINT)


def rebuilt_proposal(cfg_path: Path, db: Path) -> tuple[float, ...]:
    """Rebuild the study's optimizer from the database alone and ask it for a genome."""
    from evomerge.search.app.commands import objectives, prepare
    from evomerge.search.config import load_config
    from evomerge.search.controller import Controller
    from evomerge.search.ledger import Ledger
    from evomerge.storage.repository import Repository

    cfg = load_config(cfg_path)
    url = f"sqlite:///{db}"
    repo = Repository(url)
    record = repo.get_study(cfg.study)
    assert record is not None

    def no_workers() -> None:
        raise AssertionError("rebuilding the optimizer must not start workers")

    controller = Controller(cfg, repo, Ledger(url, cfg.study, objectives(cfg)), prepare(cfg).space,
                            no_workers, record.id)  # type: ignore[arg-type]
    controller.teller.rebuild(repo.candidates(record.id))
    assert controller.teller.name == cfg.optimizer.name
    return controller.teller.ask().x


def test_kill_9_mid_search_then_resume(tmp_path: Path) -> None:
    cfg = demo_config(tmp_path / "k.yaml", max_trials=40, limit=100)
    db = tmp_path / "k.db"
    proc = start_and_wait_for_progress(cfg, db, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    interrupted = {i for (i,) in query(db, "select id from evomerge_candidates where state='running'")}
    gens_before = query(db, "select count(*) from evomerge_generations")[0][0]
    assert interrupted
    first = rebuilt_proposal(cfg, db)
    assert rebuilt_proposal(cfg, db) == first  # the optimizer's state is a function of what was stored
    assert query(db, "select count(*) from trials where state='RUNNING'")[0][0] >= 1

    evomerge("search", str(cfg), "--storage", f"sqlite:///{db}", "--workers", "2", cwd=tmp_path)
    assert query(db, "select count(*) from trials where state='RUNNING'") == [(0,)]
    states = dict(query(db, "select state, count(*) from evomerge_candidates group by state"))
    assert states.get("running", 0) == 0 and states.get("queued", 0) == 0
    assert states.get("complete", 0) + states.get("failed", 0) == 40
    for cid in interrupted:
        (state, attempt), = query(db, f"select state, attempt from evomerge_candidates where id={cid}")
        assert state == "complete" and attempt == 2
        outcomes = [o for (o,) in query(db, f"select outcome from evomerge_attempts where candidate_id={cid} "
                                            "and split='search' order by id")]
        assert outcomes == ["abandoned: controller stopped", "ok"]
    # The optimizer continued: generations are contiguous and each told candidate finished.
    gens = [json.loads(ids) for (ids,) in query(db, "select candidate_ids_json from evomerge_generations "
                                                    "order by \"index\"")]
    assert len(gens) > gens_before >= 1
    told = [i for g in gens for i in g]
    assert len(told) == len(set(told))


@contextmanager
def served_dashboard(db: Path, cwd: Path, port: int | None = None) -> Iterator[Callable[[str], bytes]]:
    """``evomerge dashboard`` on ``db`` in a subprocess (on ``port``, else a free one), up and
    answering; yields a GET of a path."""
    import urllib.request

    from tests.helpers import free_port

    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "dashboard", "--storage", f"sqlite:///{db}",
                             "--port", str(port)], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def get(path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            assert resp.status == 200
            return bytes(resp.read())

    try:
        for _ in range(150):
            try:
                get("/api/studies")
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("dashboard did not come up")
        yield get
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_dashboard_serves_the_study_with_params_and_scores(searched: tuple[Path, Path]) -> None:
    tmp, db = searched
    with served_dashboard(db, tmp) as get:
        body = json.loads(get("/api/studies"))
        names = {s["study_name"]: s["study_id"] for s in body["study_summaries"]}
        assert "t" in names and "t:heldout" not in names  # held-out scores are on the search trials
        study = json.loads(get(f"/api/studies/{names['t']}?after=0"))
        evolved = [t for t in study["trials"] if any(a["key"] == "origin" and a["value"] == "cma"
                                                     for a in t["user_attrs"])]
        assert evolved
        trial = evolved[0]
        assert {p["name"] for p in trial["params"]} == {"cipher_a.density", "cipher_a.weight",
                                                        "cipher_b.density", "cipher_b.weight"}
        keys = {a["key"] for a in trial["user_attrs"]}
        assert {"recipe"} | {f"score.{t}" for t in TASKS} <= keys
        assert b"<html" in get("/dashboard/").lower()
