"""`evomerge merge` as a user runs it: evomerge merge files, mergekit configs, and bad input
(one line naming the model/tensor/field, exit 2, no output folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.test_bad_input import _assert_usage_error, run_cli
from evomerge.workers.sources import load_tensors


def _merge_file(path: Path, models: dict[str, Path], recipe: dict[str, Any], **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({"models": [{"name": n, "path": str(p)} for n, p in models.items()],
                                    "recipe": recipe, **extra}))
    return path


def _ties(models: tuple[str, ...] = ("a", "b")) -> dict[str, Any]:
    return {"kind": "merge", "method": "ties", "base": "base", "models": list(models),
            "params": {"density": {m: [0.5] for m in models}, "weight": {m: [0.7] for m in models}}}


def test_merge_file_with_defaults_and_lines(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """A recipe may omit parameters (declared defaults fill them); the written folder loads with
    plain transformers and carries the completed recipe."""
    recipe = {**_ties(), "transforms": ["lines"], "shared": {"alpha": [0.2], "beta": [0.8]}}
    cfg = _merge_file(tmp_path / "m.yaml", {k: tiny_models[k] for k in ("base", "a", "b")}, recipe)
    proc = run_cli("merge", str(cfg), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = json.loads((tmp_path / "out" / "evomerge_recipe.json").read_text())
    assert written["shared"]["scale"] == [1.0] and written["transforms"] == ["lines"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base = load_file(tiny_models["base"] / "model.safetensors")
    merged = dict(model.named_parameters())
    # LiNeS: layer 0 keeps alpha of the task vector, layer 1 alpha + beta; both differ from the base.
    key0, key1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(merged[key0].detach(), base[key0]) and not torch.equal(merged[key1].detach(), base[key1])


def test_pickle_sources_need_the_flag(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_models["a"], pickled)
    tensors = load_tensors("a", pickled, torch.float32)
    (pickled / "model.safetensors").unlink()
    torch.save(tensors, pickled / "pytorch_model.bin")
    cfg = _merge_file(tmp_path / "m.yaml", {"base": tiny_models["base"], "a": pickled, "b": tiny_models["b"]},
                      _ties())
    _assert_usage_error(run_cli("merge", str(cfg), "--out", str(tmp_path / "out"), cwd=tmp_path),
                        "model 'a'", "--allow-pickle")
    assert not (tmp_path / "out").exists()
    proc = run_cli("merge", str(cfg), "--out", str(tmp_path / "out"), "--allow-pickle", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    reference = tmp_path / "ref.yaml"
    _merge_file(reference, {k: tiny_models[k] for k in ("base", "a", "b")}, _ties())
    assert run_cli("merge", str(reference), "--out", str(tmp_path / "ref"), cwd=tmp_path).returncode == 0
    assert load_file(tmp_path / "out" / "model.safetensors") .keys() == load_file(tmp_path / "ref" / "model.safetensors").keys()
    ours, ref = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def _variant(tmp_path: Path, source: Path, name: str, change: Any) -> Path:
    folder = tmp_path / name
    shutil.copytree(source, folder)
    tensors = load_tensors(name, folder, torch.float32)
    change(tensors, folder)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_mismatched_sources_are_refused_before_any_output(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    key = "model.layers.1.self_attn.q_proj.weight"
    half = _variant(tmp_path, tiny_models["a"], "half", lambda t, _: t.__setitem__(key, t[key].half()))
    cases = {
        "dtype": (half, ["'x'", key, "dtype"]),
        "shape": (tiny_models["wide"], ["'x'", "hidden_size"]),
    }
    for label, (folder, fragments) in cases.items():
        cfg = _merge_file(tmp_path / f"{label}.yaml", {"base": tiny_models["base"], "x": folder, "b": tiny_models["b"]},
                          _ties(("x", "b")))
        _assert_usage_error(run_cli("merge", str(cfg), "--out", str(tmp_path / label), cwd=tmp_path), *fragments)
        assert not (tmp_path / label).exists()


@pytest.mark.parametrize("patch, fragments", [
    ({"merge_method": "nuslerp"}, ["merge_method", "'nuslerp' is not supported"]),
    ({"slices": []}, ["slices", "field not supported"]),
    ({"tokenizer_source": "union"}, ["tokenizer_source", "'union'"]),
    ({"parameters": {"rescale": False}}, ["parameters.rescale", "not supported for ties"]),
    ({"models": "x"}, ["models"]),
])
def test_unsupported_mergekit_fields_are_named(tmp_path: Path, tiny_models: dict[str, Path],
                                               patch: dict[str, Any], fragments: list[str]) -> None:
    cfg: dict[str, Any] = {"merge_method": "ties", "base_model": str(tiny_models["base"]),
                           "models": [{"model": str(tiny_models["a"]), "parameters": {"weight": 1.0}}]}
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump({**cfg, **patch}))
    _assert_usage_error(run_cli("merge", str(path), "--out", str(tmp_path / "out"), cwd=tmp_path),
                        "mergekit config", *fragments)
    assert not (tmp_path / "out").exists()


def test_bad_recipe_in_merge_file(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    models = {k: tiny_models[k] for k in ("base", "a", "b")}
    slerp = {"kind": "merge", "method": "slerp", "base": "base", "models": ["a", "b"], "shared": {"t": [0.5]}}
    _assert_usage_error(run_cli("merge", str(_merge_file(tmp_path / "s.yaml", models, slerp)), "--out",
                                str(tmp_path / "o"), cwd=tmp_path), "slerp merges exactly 1 expert")
    ghost = {**_ties(), "models": ["a", "ghost"],
             "params": {"density": {"a": [0.5], "ghost": [0.5]}, "weight": {"a": [1], "ghost": [1]}}}
    _assert_usage_error(run_cli("merge", str(_merge_file(tmp_path / "g.yaml", models, ghost)), "--out",
                                str(tmp_path / "o"), cwd=tmp_path), "'ghost'")
    assert not (tmp_path / "o").exists()
