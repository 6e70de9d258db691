"""LoRA adapter folders as sources: merged into their base exactly as peft merges them, in a
merge file and in a search (workers, replay), and bad adapters refused in one line (exit 2,
nothing written) before any work."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers import save_tiny_model, write_config
from tests.test_bad_input import _assert_usage_error, run_cli

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def make_adapter(folder: Path, base: Path, seed: int = 0, targets: list[str] = TARGETS) -> Path:
    """A LoRA adapter over ``base`` with random, non-zero A and B (peft's default B is zero)."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def merged_by_peft(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The reference: the adapter merged by hand with peft's merge_and_unload."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def adapter_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = save_tiny_model(root / "base")
    return {
        "base": base,
        "lora": make_adapter(root / "lora", base),
        "b": save_tiny_model(root / "b", seed=2, noise=0.05),
        "other_base": save_tiny_model(root / "other_base", seed=3, noise=0.05),
        "wide": save_tiny_model(root / "wide", hidden=48),
    }


def _merge_file(path: Path, models: dict[str, Path], recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"models": [{"name": n, "path": str(p)} for n, p in models.items()],
                                    "recipe": recipe}))
    return path


def _assert_close(written: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key, tensor in written.items():
        assert (tensor - expected[key]).abs().max().item() <= 1e-6, key


def test_merge_file_with_an_adapter_source(tmp_path: Path, adapter_models: dict[str, Path]) -> None:
    """``evomerge merge``: the adapter as a source is the base with the adapter merged by
    peft; in a task-arithmetic merge its task vector is that model's minus the base."""
    models = {k: adapter_models[k] for k in ("base", "lora", "b")}
    reference = merged_by_peft(adapter_models["base"], adapter_models["lora"])
    as_source = _merge_file(tmp_path / "s.yaml", models, {"kind": "source", "source": "lora"})
    proc = run_cli("merge", str(as_source), "--out", str(tmp_path / "source"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = load_file(tmp_path / "source" / "model.safetensors")
    base = load_file(adapter_models["base"] / "model.safetensors")
    assert written.keys() == base.keys()
    assert any(not torch.equal(written[k], base[k]) for k in base)  # the adapter changed something
    _assert_close(written, reference)

    recipe = {"kind": "merge", "method": "task_arithmetic", "base": "base", "models": ["lora", "b"],
              "params": {"weight": {"lora": [0.7], "b": [0.4]}}, "shared": {"scale": [1.0]}}
    merge = _merge_file(tmp_path / "m.yaml", models, recipe)
    proc = run_cli("merge", str(merge), "--out", str(tmp_path / "merged"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    other = load_file(adapter_models["b"] / "model.safetensors")
    expected = {k: base[k] + 0.7 * (reference[k] - base[k]) + 0.4 * (other[k] - base[k]) for k in base}
    _assert_close(load_file(tmp_path / "merged" / "model.safetensors"), expected)


def test_search_and_replay_with_an_adapter_source(tmp_path: Path, adapter_models: dict[str, Path],
                                                  tiny_tasks: Path) -> None:
    """A search whose expert is an adapter runs on Ray workers without a failed trial; the
    replay of the adapter's source baseline equals peft's merge."""
    models = {k: adapter_models[k] for k in ("base", "lora", "b")}
    cfg = write_config(tmp_path / "search.yaml", models, tiny_tasks, budget={"max_trials": 6})
    db = tmp_path / "s.db"
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{db}", "--workers", "1", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select trial_number, recipe_json, state from evomerge_candidates").fetchall()
    assert {state for _, _, state in rows} == {"complete"}
    (trial,) = [t for t, r, _ in rows if json.loads(r).get("source") == "lora"]
    out = tmp_path / "replayed"
    proc = run_cli("replay", "--storage", f"sqlite:///{db}", "--trial", str(trial), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_close(load_file(out / "model.safetensors"), merged_by_peft(adapter_models["base"], adapter_models["lora"]))


def _broken(tmp_path: Path, models: dict[str, Path], how: str) -> Path:
    """A copy of the good adapter (or one made elsewhere), broken as ``how`` says."""
    folder = tmp_path / "bad"
    if how == "other base":
        return make_adapter(folder, models["other_base"])
    if how == "wrong shapes":  # made on the wider model, then pointed at the base
        make_adapter(folder, models["wide"])
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(models["base"])}))
        return folder
    shutil.copytree(models["lora"], folder)
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if how == "no weights":
        weights.unlink()
    elif how == "corrupt weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "corrupt config":
        config_file.write_text("{not json")
    elif how == "not lora":
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "peft_type": "PROMPT_TUNING"}))
    elif how == "no base":
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                           "base_model_name_or_path": str(tmp_path / "nowhere")}))
    return folder


BAD = [("no weights", ["no adapter_model.safetensors"]),
       ("corrupt weights", ["corrupt safetensors file", "adapter_model.safetensors"]),
       ("corrupt config", ["unreadable adapter config"]),
       ("not lora", ["not a LoRA adapter", "PROMPT_TUNING"]),
       ("no base", ["neither a folder nor a hub id"]),
       ("other base", ["made for base", "not the configured base 'base'"]),
       ("wrong shapes", ["adapter tensor", "does not fit the base's model.layers.0"])]


@pytest.mark.parametrize("how, fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_adapter_is_refused_by_merge(tmp_path: Path, adapter_models: dict[str, Path], how: str,
                                         fragments: list[str]) -> None:
    bad = _broken(tmp_path, adapter_models, how)
    merge = _merge_file(tmp_path / "m.yaml", {"base": adapter_models["base"], "lora": bad, "b": adapter_models["b"]},
                        {"kind": "merge", "method": "task_arithmetic", "base": "base", "models": ["lora", "b"]})
    _assert_usage_error(run_cli("merge", str(merge), "--out", str(tmp_path / "out"), cwd=tmp_path),
                        "model 'lora'", *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["other base", "wrong shapes"])
def test_bad_adapter_is_refused_by_search(tmp_path: Path, adapter_models: dict[str, Path], tiny_tasks: Path,
                                          how: str) -> None:
    bad = _broken(tmp_path, adapter_models, how)
    cfg = write_config(tmp_path / "search.yaml", {"base": adapter_models["base"], "lora": bad, "b": adapter_models["b"]},
                       tiny_tasks)
    _assert_usage_error(run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 's.db'}", cwd=tmp_path),
                        "model 'lora'", *dict(BAD)[how])
    assert not (tmp_path / "s.db").exists()


def test_an_adapter_cannot_be_the_base(tmp_path: Path, adapter_models: dict[str, Path], tiny_tasks: Path) -> None:
    cfg = write_config(tmp_path / "search.yaml", {k: adapter_models[k] for k in ("lora", "base", "b")}, tiny_tasks)
    _assert_usage_error(run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 's.db'}", cwd=tmp_path),
                        "model 'lora'", "base model is a LoRA adapter")
    assert not (tmp_path / "s.db").exists()
