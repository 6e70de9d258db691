"""Bad input: one clear line on stderr, exit status 2, and nothing written to the database."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import ROOT, write_config
from workers.sources import SourceError, SourceModel, load_tensors, validate_sources


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def _assert_usage_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("patch, fragments", [
    ({"merge": {"method": "frobnicate"}}, ["merge.method", "unknown merge method 'frobnicate'"]),
    ({"budget": {"max_trials": 0}}, ["budget.max_trials"]),
    ({"colour": "blue"}, ["colour", "unknown field"]),
    ({"base_model": "nobody"}, ["base_model 'nobody' is not one of the models"]),
    ({"merge": {"method": "ties", "ranges": {"gamma": [0, 1]}}}, ["ties has no parameter 'gamma'"]),
    ({"space": "ps+dfs", "dfs": {"models": ["a", "base"]}}, ["dfs.models", "add 'ps'"]),
    ({"space": "dfs", "dfs": {"models": ["a", "ghost"]}}, ["dfs.models", "'ghost' is not one of the models"]),
])
def test_bad_config(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path,
                    patch: dict[str, object], fragments: list[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, tiny_tasks, **patch)
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    _assert_usage_error(proc, str(cfg), *fragments)
    assert not (tmp_path / "x.db").exists()


def test_not_yaml_and_missing_config(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("models: [unclosed\n")
    _assert_usage_error(run_cli("search", "c.yaml", cwd=tmp_path), "not valid YAML")
    _assert_usage_error(run_cli("search", "nope.yaml", cwd=tmp_path), "config file not found")


def test_missing_model_folder(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"base": tiny_models["base"], "gone": tmp_path / "no-such-model"},
                       tiny_tasks)
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    _assert_usage_error(proc, "model 'gone'", "folder not found")
    assert not (tmp_path / "x.db").exists()


def test_models_of_different_shapes(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"base": tiny_models["base"], "wide": tiny_models["wide"]}, tiny_tasks)
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    _assert_usage_error(proc, "'base'", "'wide'", "hidden_size")
    assert not (tmp_path / "x.db").exists()


def test_missing_task_data(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(tiny_tasks, tasks)
    (tasks / "data" / "tiny_sub_heldout.jsonl").unlink()
    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, tasks)
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    _assert_usage_error(proc, "task 'tiny_sub'", "data file not found")
    assert not (tmp_path / "x.db").exists()


def test_bad_storage_url_and_unknown_study(tmp_path: Path) -> None:
    _assert_usage_error(run_cli("status", "--storage", "nosuchdb://x", cwd=tmp_path), "not a usable SQLAlchemy URL")
    _assert_usage_error(run_cli("status", "--storage", f"sqlite:///{tmp_path / 'e.db'}", "--study", "s",
                                cwd=tmp_path), "no study 's'")


def test_source_checks(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    # Same architecture but a tensor missing.
    lacking = tmp_path / "lacking"
    shutil.copytree(tiny_models["a"], lacking)
    tensors = load_tensors("a", lacking, torch.float32)
    dropped = sorted(tensors)[-1]
    del tensors[dropped]
    save_file(tensors, lacking / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match=f"model 'lacking' lacks tensor {dropped}"):
        validate_sources([SourceModel("base", str(tiny_models["base"])), SourceModel("lacking", str(lacking))])
    # A truncated file.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["a"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="corrupt safetensors file"):
        validate_sources([SourceModel("base", str(tiny_models["base"])), SourceModel("broken", str(broken))])
    # A pickle checkpoint is refused, not loaded.
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_models["a"], pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(SourceError, match="safetensors only"):
        validate_sources([SourceModel("pickled", str(pickled))])
    # Non-finite weights are refused at load.
    nan = tmp_path / "nan"
    shutil.copytree(tiny_models["a"], nan)
    tensors = load_tensors("a", nan, torch.float32)
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match=f"tensor {key} holds NaN"):
        load_tensors("nan", nan, torch.float32)


def test_stored_config_that_no_longer_validates(tmp_path: Path) -> None:
    """A study row whose config this version cannot read (another version wrote it): replay
    says so in one line, exit 2, and writes nothing."""
    from storage.repository import Repository

    Repository(f"sqlite:///{tmp_path / 's.db'}").create_study("old", '{"study": "old", "models": [], "colour": 1}')
    proc = run_cli("replay", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--out", str(tmp_path / "m"), cwd=tmp_path)
    _assert_usage_error(proc, "stored config of study 'old' does not validate", "models")
    assert not (tmp_path / "m").exists()
