"""Writing a model folder is all or nothing: a failed verification, an exception or a kill -9
at any moment leaves no output folder, and the next write cleans what a dead writer left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from tests.helpers import cli_env
from tests.test_bad_input import run_cli
from evomerge.workers.materialize import Materializer
from evomerge.workers.recipe import Recipe, recipe_from
from evomerge.workers.replay import ReplayError, _write, write_model_folder


def _recipe() -> Recipe:
    return recipe_from({"kind": "merge", "method": "task_arithmetic", "base": "base", "models": ["a", "b"],
                             "params": {"weight": {"a": [0.6], "b": [0.4]}}})


def _merge_file(path: Path, tiny_models: dict[str, Path]) -> Path:
    path.write_text(yaml.safe_dump({"models": [{"name": n, "path": str(tiny_models[n])} for n in ("base", "a", "b")],
                                    "recipe": json.loads(_recipe().to_json())}))
    return path


def _partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial-*"))


def test_failed_verification_leaves_no_folder(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    mat = Materializer({k: tiny_models[k] for k in ("base", "a", "b")}, "base")
    mat.apply(_recipe())
    seen: list[Path] = []

    def reject(folder: Path) -> None:
        seen.append(folder)
        assert (folder / "config.json").exists()  # verification reads the complete folder...
        raise ReplayError("written model differs")

    with pytest.raises(ReplayError):
        _write(mat.model, mat, _recipe(), tmp_path / "out", "card", "2GB", reject)
    assert seen and seen[0] != tmp_path / "out"  # ...before it is renamed into place
    assert not (tmp_path / "out").exists() and not _partials(tmp_path)


def test_partials_of_dead_writers_are_removed(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}"
    alive = tmp_path / f".out.partial-{os.getppid()}"  # a concurrent writer: left alone
    other = tmp_path / f".other.partial-{int(dead.stdout)}"  # another output's: not ours to judge
    for folder in (stale, alive, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a file")
    mat = Materializer({k: tiny_models[k] for k in ("base", "a", "b")}, "base")
    write_model_folder(mat, _recipe(), tmp_path / "out", "card")
    assert not stale.exists() and alive.exists() and other.exists()
    assert (tmp_path / "out" / "evomerge_recipe.json").exists()


def test_kill_9_mid_write_leaves_nothing_and_rerun_succeeds(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    cfg = _merge_file(tmp_path / "m.yaml", tiny_models)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "merge", str(cfg), "--out", str(out)], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not _partials(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    assert _partials(tmp_path), "the merge never started writing (or finished between two polls)"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if out.exists():  # the signal landed after the rename (a very loaded machine): complete, verified
        assert not _partials(tmp_path) and AutoModelForCausalLM.from_pretrained(out) is not None
        shutil.rmtree(out)
    else:  # killed mid-write: a partial sibling, no output folder
        assert _partials(tmp_path)

    done = run_cli("merge", str(cfg), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not _partials(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers > 0
