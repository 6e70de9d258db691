"""Parity with mergekit (a test-only dependency): the same YAML config, merged by mergekit and by
evomerge, gives the same tensors (deterministic methods, float32: max |diff| <= 1e-6) or the same
keep rate and expectation (random methods, within sampling error)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.search.app.cli import main
from evomerge.search.app.merge_file import load_merge_file
from evomerge.workers.mergekit import from_mergekit, to_mergekit
from evomerge.workers.materialize import Materializer

from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge


def _config(models: dict[str, Path], method: str, experts: dict[str, dict[str, Any]],
            top: dict[str, Any] | None = None, base: str | None = "base") -> dict[str, Any]:
    cfg: dict[str, Any] = {"merge_method": method, "dtype": "float32",
                           "models": [{"model": str(models[n]), **({"parameters": p} if p else {})}
                                      for n, p in experts.items()]}
    if base:
        cfg["base_model"] = str(models[base])
    if top:
        cfg["parameters"] = top
    return cfg


def _mergekit(cfg: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              options=MergeOptions(copy_tokenizer=True, quiet=True, random_seed=0))
    return load_file(out / "model.safetensors")


def _ours(cfg: dict[str, Any], tmp: Path) -> dict[str, torch.Tensor]:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    job = load_merge_file(path)
    names = dict.fromkeys((job.recipe.base or "", *job.recipe.models))
    mat = Materializer({n: Path(job.sources[n]) for n in names}, job.recipe.base or "")
    mat.apply(job.recipe)
    return {k: p.detach().clone() for k, p in mat.model.state_dict().items()}


DETERMINISTIC = {
    "linear": ({"base": {"weight": 0.2}, "a": {"weight": 0.3}, "b": {"weight": 0.7}}, None),
    "task_arithmetic": ({"a": {"weight": [0.2, 1.0]}, "b": {"weight": 0.5}}, {"lambda": 0.9}),
    "ties": ({"base": {}, "a": {"density": 0.5, "weight": 1.0}, "b": {"density": 0.7, "weight": 0.6}}, None),
    "ties_raw": ({"a": {"density": 0.3, "weight": 0.9}, "b": {"density": 0.6, "weight": 1.2}},
                 {"normalize": False}),
    "breadcrumbs": ({"a": {"density": 0.8, "gamma": 0.05, "weight": 0.7}, "b": {"density": 0.6, "weight": 0.5}},
                    None),
    "breadcrumbs_ties": ({"a": {"density": 0.8, "gamma": 0.05, "weight": 0.7},
                          "b": {"density": 0.6, "gamma": 0.1, "weight": 0.5}}, {"normalize": True}),
    "slerp": ({"base": {}, "a": {}}, {"t": [0.1, 0.9]}),
    "model_stock": ({"a": {}, "b": {}}, None),
    "module_filters": ({"a": {"weight": [{"filter": "self_attn", "value": 0.9}, {"filter": "mlp", "value": 0.1},
                                         {"value": 0.5}]}, "b": {"weight": 0.4}}, None),
}


def _correlated(tiny_models: dict[str, Path], root: Path) -> dict[str, Path]:
    """Experts sharing a common direction (cos of task vectors > 0), as fine-tunes of one base
    are: Model Stock's regime. Where they point apart, mergekit extrapolates (t < 0) and we
    keep the base, on purpose."""
    base = load_file(tiny_models["base"] / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    shared = {k: torch.randn(v.shape, generator=gen) for k, v in base.items()}
    out = dict(tiny_models)
    for name in ("a", "b"):
        folder = root / f"corr_{name}"
        shutil.copytree(tiny_models[name], folder)
        save_file({k: v + 0.05 * (shared[k] + torch.randn(v.shape, generator=gen)) for k, v in base.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
        out[name] = folder
    return out


@pytest.mark.parametrize("case", sorted(DETERMINISTIC))
def test_deterministic_methods_match_mergekit(case: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    experts, top = DETERMINISTIC[case]
    method = {"ties_raw": "ties", "module_filters": "task_arithmetic"}.get(case, case)
    models = _correlated(tiny_models, tmp_path) if method == "model_stock" else tiny_models
    cfg = _config(models, method, experts, top, base=None if method == "linear" else "base")
    theirs = _mergekit(cfg, tmp_path / "mk")
    ours = _ours(cfg, tmp_path)
    assert set(theirs) <= set(ours)
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
    assert worst <= 1e-6, f"{case}: max |ours - mergekit| = {worst}"
    base = load_file(tiny_models["base"] / "model.safetensors")
    assert any(not torch.equal(ours[k], base[k]) for k in theirs)  # the merge did something


def _flat_delta(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(state[k] - base[k]).flatten() for k in sorted(base)])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_agree_with_mergekit_in_keep_rate_and_expectation(
        method: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """One expert at weight 0.8: merged − base is the rescaled, masked task vector. Its keep rate
    is the density, and its projection on sign(δ) has the expectation w·mean|δ| (mergekit
    matches the L1 norm exactly; evomerge's 1/p rescale matches it in expectation). DELLA
    normalizes by default, which cancels a single expert's weight (w = 1)."""
    density = 0.6
    params: dict[str, Any] = {"density": density, "weight": 0.8}
    if method.startswith("della"):
        params["epsilon"] = 0.2
    cfg = _config(tiny_models, method, {"a": params})
    base = load_file(tiny_models["base"] / "model.safetensors")
    delta = _flat_delta(load_file(tiny_models["a"] / "model.safetensors"), base)
    n = delta.numel()
    for name, state in (("mergekit", _mergekit(cfg, tmp_path / "mk")), ("evomerge", _ours(cfg, tmp_path))):
        merged = _flat_delta(state, base)
        kept = float((merged != 0).float().mean())
        sigma = math.sqrt(density * (1 - density) / n)
        assert abs(kept - density) < 5 * sigma, f"{name}: keep rate {kept:.4f} vs density {density}"
        projection = float((merged * torch.sign(delta)).mean())
        expected = (1.0 if method == "della" else 0.8) * float(delta.abs().mean())
        assert projection == pytest.approx(expected, rel=0.05), f"{name}: E[merged-base] off"


def test_export_round_trips_through_mergekit(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """to_mergekit(recipe) read back by mergekit gives our model; read back by us, our recipe."""
    cfg = _config(tiny_models, "ties", {"a": {"density": 0.4, "weight": [0.5, 1.0]}, "b": {"density": 0.9, "weight": 0.3}},
                  {"normalize": False, "lambda": 1.1})
    job = from_mergekit(cfg, tmp_path)
    text = to_mergekit(job.recipe, job.sources)
    again = from_mergekit(yaml.safe_load(text), tmp_path)
    assert again.recipe.content_hash == job.recipe.content_hash
    theirs = _mergekit(yaml.safe_load(text), tmp_path / "mk")
    ours = _ours(cfg, tmp_path)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) <= 1e-6


def test_merge_command_writes_a_model_folder(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "slerp.yaml"
    cfg.write_text(yaml.safe_dump(_config(tiny_models, "slerp", {"base": {}, "b": {}}, {"t": 0.3})))
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "evomerge_recipe.json").is_file()
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2  # never overwrites
