"""Validation that comes before any work: tasks, splits and metrics are checked in the
controller before a worker starts; a search whose trials all failed says so and exits
non-zero; reading commands never create a database."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from evomerge.evaluators.spec import TaskError
from evomerge.search.app.cli import main
from evomerge.search.app.commands import Prepared, SearchFailed, prepare, run_search
from evomerge.search.config import ConfigError, load_config
from evomerge.search.stages import ps_space
from tests.helpers import write_config
from tests.test_bad_input import run_cli
from evomerge.workers.sources import validate_sources

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray


@pytest.fixture(scope="module")
def task_dir(tiny_tasks: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tasks, plus a generate_until task (metric exact_match) and a group of two tasks."""
    folder = tmp_path_factory.mktemp("tasks") / "tasks"
    shutil.copytree(tiny_tasks, folder)
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        "    search: data/tiny_add_search.jsonl\n    heldout: data/tiny_add_heldout.jsonl\n"
        "test_split: search\noutput_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"=\"]\n  max_gen_toks: 4\n")
    (folder / "tiny_both.yaml").write_text("group: tiny_both\ntask: [tiny_add, tiny_sub]\n")
    return folder


def _config(tmp_path: Path, models: dict[str, Path], task_dir: Path, **evaluation: object) -> Path:
    ev = {"task_paths": [str(task_dir)], "tasks": [{"name": "tiny_add"}, {"name": "tiny_sub"}],
          "search_split": "search", "heldout_split": "heldout", "heldout_top_k": 0, **evaluation}
    return write_config(tmp_path / "c.yaml", {k: models[k] for k in ("base", "a")}, task_dir, evaluation=ev,
                        budget={"max_trials": 4}, workers={"count": 1})


@pytest.mark.parametrize("evaluation, message", [
    ({"heldout_split": "test"},
     "evaluation.heldout_split 'test': task 'tiny_add' has no such split (its data files: search, heldout)"),
    ({"search_split": "train"},
     "evaluation.search_split 'train': task 'tiny_add' has no such split (its data files: search, heldout)"),
    ({"tasks": [{"name": "tiny_gen", "metric": "acc"}]}, "task 'tiny_gen' has no metric 'acc' (its metrics: exact_match)"),
    ({"tasks": [{"name": "tiny_gen", "metric": "exact_match,strict"}]},
     "task 'tiny_gen' has no filter 'strict' for metric 'exact_match': name one of exact_match,none"),
    ({"tasks": [{"name": "tiny_both"}]}, "task 'tiny_both' is a group of several tasks in evaluation.task_paths"),
    ({"tasks": [{"name": "tiny_add"}, {"name": "tiny_mul"}]}, "task 'tiny_mul': unknown (not a task in"),
])
def test_tasks_splits_and_metrics_are_checked_in_the_controller(
        tmp_path: Path, tiny_models: dict[str, Path], task_dir: Path, evaluation: dict[str, object], message: str) -> None:
    """``prepare`` (run before anything is written or any worker starts) builds the tasks as a
    worker will and refuses what a worker would fail on, naming the task and the field."""
    cfg = load_config(_config(tmp_path, tiny_models, task_dir, **evaluation))
    with pytest.raises(TaskError) as info:
        prepare(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_split_is_a_name_not_a_path(tmp_path: Path, tiny_models: dict[str, Path], task_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"evaluation.search_split: '../../etc/passwd' is not a split name"):
        load_config(_config(tmp_path, tiny_models, task_dir, search_split="../../etc/passwd"))


def test_a_good_suite_passes(tmp_path: Path, tiny_models: dict[str, Path], task_dir: Path) -> None:
    """The checks refuse only what is wrong: a generate_until task scored by exact_match, with
    its filter named or not, passes."""
    prepare(load_config(_config(tmp_path, tiny_models, task_dir, tasks=[
        {"name": "tiny_add"}, {"name": "tiny_gen", "metric": "exact_match"},
        {"name": "tiny_gen", "metric": "exact_match,none"}])))


def test_wrong_metric_is_one_line_and_nothing_is_written(tmp_path: Path, tiny_models: dict[str, Path],
                                                         task_dir: Path) -> None:
    """The real CLI: exit 2 and one line before the database exists (it used to fail all 12
    trials with "non-finite score" and exit 0)."""
    cfg = _config(tmp_path, tiny_models, task_dir, tasks=[{"name": "tiny_gen", "metric": "acc"}])
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--max-trials", "2",
                   cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "evomerge: error: task 'tiny_gen' has no metric 'acc' (its metrics: exact_match)"]
    assert not (tmp_path / "x.db").exists()


def _unchecked(cfg_path: Path) -> Prepared:
    """What ``prepare`` returns, without its task checks: a mistake that slips past them."""
    cfg = load_config(cfg_path)
    folders = validate_sources(cfg.sources())
    return Prepared(cfg, folders, ps_space(cfg, folders))


def test_a_search_whose_trials_all_failed_fails(tmp_path: Path, tiny_models: dict[str, Path], task_dir: Path,
                                               ray_session: None) -> None:
    """Every trial fails (a metric the task does not report): the search raises SearchFailed
    (exit 1) with the reasons counted, and each trial names the missing metric."""
    prep = _unchecked(_config(tmp_path, tiny_models, task_dir, tasks=[{"name": "tiny_add", "metric": "nope"}]))
    with pytest.raises(SearchFailed) as info:
        run_search(prep, f"sqlite:///{tmp_path / 'f.db'}", "t", 1, None, 4, None)
    assert str(info.value) == ("study 't': all 4 trials failed: 4 x evaluate: MissingMetric: task 'tiny_add' has "
                               "no metric 'nope' (it reports: acc,none)")
    with sqlite3.connect(tmp_path / "f.db") as conn:  # the Optuna ledger agrees: every trial FAIL, none RUNNING
        assert conn.execute("select state, count(*) from trials group by state").fetchall() == [("FAIL", 4)]


def test_a_search_whose_heldout_rescores_all_failed_fails(tmp_path: Path, tiny_models: dict[str, Path],
                                                         task_dir: Path, ray_session: None) -> None:
    """The search trials complete, every held-out re-score fails (a split the tasks lack):
    SearchFailed with the reason, not exit 0 with "0 re-scored"."""
    prep = _unchecked(_config(tmp_path, tiny_models, task_dir, heldout_split="nosuch"))
    with pytest.raises(SearchFailed) as info:
        run_search(prep, f"sqlite:///{tmp_path / 'h.db'}", "t", 1, None, 4, None)
    assert str(info.value) == (
        "study 't': all 4 held-out re-scores failed: 4 x evaluate: TaskError: evaluation.heldout_split 'nosuch': "
        "task 'tiny_add' has no such split (its data files: search, heldout)")


@pytest.mark.parametrize("command", [["status"], ["replay", "--out", "m"]])
def test_reading_commands_never_create_a_database(tmp_path: Path, command: list[str], monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the default storage is sqlite:///evomerge.db in the current folder
    for storage in ([], ["--storage", f"sqlite:///{tmp_path / 'other.db'}"]):
        assert main([*command, *storage]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "no database at" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dashboard_never_creates_a_database(tmp_path: Path) -> None:
    proc = run_cli("dashboard", "--storage", f"sqlite:///{tmp_path / 'd.db'}", "--port", "1", cwd=tmp_path,
                   timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"evomerge: error: --storage sqlite:///{tmp_path / 'd.db'}: "
                                                f"no database at {tmp_path / 'd.db'} (nothing to read)"]
    assert not (tmp_path / "d.db").exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "dash.example"])
def test_dashboard_refuses_the_network_unless_asked(tmp_path: Path, host: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard", "--storage", f"sqlite:///{tmp_path / 'd.db'}", "--host", host]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"--host {host}" in line and "unauthenticated" in line and "--allow-remote" in line
    assert not (tmp_path / "d.db").exists()


def test_a_study_whose_optuna_trials_were_deleted_is_not_resumed(tmp_path: Path, tiny_models: dict[str, Path],
                                                                  task_dir: Path) -> None:
    """optuna-dashboard can delete a study; the next search must not recreate it with trial
    numbers that clash with the candidates' (it did, silently)."""
    import optuna

    from evomerge.search.controller import StudyMismatch
    from evomerge.search.ledger import Ledger
    from evomerge.storage.repository import Repository

    cfg = load_config(write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, task_dir))
    url = f"sqlite:///{tmp_path / 'x.db'}"
    repo = Repository(url)
    record = repo.create_study("t", cfg.model_dump_json())
    cid = repo.add_candidate(record.id, "{}", "h", "source")
    repo.start_attempt(cid, Ledger(url, "t").open_trial({}, {}, {}), "search")
    assert Ledger.exists(url, "t")
    optuna.delete_study(study_name="t", storage=url)
    assert not Ledger.exists(url, "t")
    with pytest.raises(StudyMismatch, match="Optuna trials are gone"):
        run_search(prepare(cfg), url, "t", 1, None, 4, None)
    assert not Ledger.exists(url, "t")  # nothing recreated
