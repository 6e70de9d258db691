"""Replay: write a recipe's model as an ordinary Hugging Face model folder, atomically.

The folder is assembled in a temporary sibling, every file fsync'ed, reloaded and compared
tensor by tensor with what was materialized, and only then renamed into place: whenever the
process dies, the output folder is either absent or complete and verified. Partial siblings
left by a process that died are removed by the next write to the same folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.workers.candidate_model import CandidateModel
from evomerge.workers.materialize import Materializer
from evomerge.workers.recipe import Recipe, RouteRecipe
from evomerge.workers.route_spec import Route
from evomerge.workers.routing import export_config, export_state_dict


class ReplayError(RuntimeError):
    """The model folder could not be written or did not verify; one line."""


def model_card(recipe: Recipe, study: str, trial: int | None, scores: dict[str, float] | None,
               fitness: float | None, heldout: dict[str, float] | None, heldout_fitness: float | None) -> str:
    """A README.md carrying the recipe and its scores."""
    lines = [
        "---", "library_name: transformers", "tags: [merge, evomerge]", "---", "",
        f"# {study} — trial {trial if trial is not None else '-'}", "",
        f"Merged by evomerge from study `{study}`: {recipe.summary()}.", "",
        "## Scores", "", "| split | fitness | " + " | ".join(sorted(scores or {})) + " |",
        "|---|---|" + "---|" * len(scores or {}),
    ]
    for split, sc, fit in (("search", scores, fitness), ("held-out", heldout, heldout_fitness)):
        if sc:
            lines.append(f"| {split} | {fit:.4f} | " + " | ".join(f"{sc[k]:.4f}" for k in sorted(sc)) + " |")
    lines += ["", "## Recipe", "", "```json", json.dumps(json.loads(recipe.to_json()), indent=2, sort_keys=True),
              "```", ""]
    return "\n".join(lines)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and the folder; files made readable like any model download
    (safetensors writes its file 0600)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            path.chmod(0o644)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_folder(materializer: Materializer, recipe: Recipe, out: Path, card: str,
                       max_shard_size: str = "2GB") -> Path:
    """Materialize ``recipe`` and write it to ``out`` (which must not exist yet). A route
    recipe is written as an ordinary model with one layer per hop (:func:`route_model`)."""
    if isinstance(recipe, RouteRecipe):
        candidate = CandidateModel(materializer)
        candidate.apply(recipe)
        try:
            exported = route_model(candidate, recipe)
            return _write(exported, materializer, recipe, out, card, max_shard_size,
                          lambda folder: verify_route(candidate.model, exported, folder))
        finally:
            candidate.release()
    materializer.apply(recipe)
    return _write(materializer.model, materializer, recipe, out, card, max_shard_size,
                  lambda folder: verify_folder(materializer.model, folder))


def _write(model: PreTrainedModel, materializer: Materializer, recipe: Recipe, out: Path, card: str,
           max_shard_size: str, verify: Callable[[Path], None]) -> Path:
    out = out.resolve()
    if out.exists():
        raise ReplayError(f"output folder already exists: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    tmp = out.parent / f"{_PARTIAL.format(name=out.name)}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        materializer.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        (tmp / "evomerge_recipe.json").write_text(recipe.to_json() + "\n")
        _fsync_tree(tmp)
        verify(tmp)
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_PARTIAL = ".{name}.partial-"  # + the writer's pid


def _remove_dead_partials(out: Path) -> None:
    """Delete partial siblings of ``out`` whose writer no longer runs (killed mid-write); a
    writer still alive (another replay to the same folder) keeps its own."""
    prefix = _PARTIAL.format(name=out.name)
    for partial in out.parent.glob(f"{prefix}*"):
        pid = partial.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@torch.no_grad()
def route_model(candidate: CandidateModel, recipe: RouteRecipe) -> PreTrainedModel:
    """The route as an ordinary model of the head's architecture: one decoder layer per hop,
    hop scales folded into the weights (:func:`workers.routing.export_state_dict`)."""
    materializer = candidate.materializer
    tensors = {name: candidate.tensors_of(recipe, name) for name in recipe.models}
    config = candidate.config  # the model's own config: while a route is applied, the model holds the route's
    route = Route(recipe.base, recipe.route, recipe.scales)
    exported = export_config(route, {n: config for n in recipe.models})
    state = export_state_dict(route, tensors, bool(getattr(config, "tie_word_embeddings", False)))
    model = AutoModelForCausalLM.from_config(exported, dtype=materializer.model.dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def verify_folder(model: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """Reload ``folder`` and check every parameter equals ``model``'s bit for bit; returns the
    reloaded model."""
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype, trust_remote_code=False).eval()
    mine = dict(model.named_parameters())
    for key, param in reloaded.named_parameters():
        if key not in mine or not torch.equal(param.detach().cpu(), mine[key].detach().cpu()):
            raise ReplayError(f"written model differs from the materialized one at tensor {key}")
    return reloaded


@torch.no_grad()
def verify_route(routed: PreTrainedModel, exported: PreTrainedModel, folder: Path) -> None:
    """The folder holds ``exported`` bit for bit, and its logits equal the in-memory route's on
    random token ids (:func:`route_tolerance`)."""
    reloaded = verify_folder(exported, folder)
    vocab = int(reloaded.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(routed.device)
    expected = routed(ids).logits.float()
    diff = float((reloaded.to(routed.device)(ids).logits.float() - expected).abs().max())
    tolerance = route_tolerance(routed.dtype, float(expected.abs().max()))
    if not diff <= tolerance:
        raise ReplayError(f"written route model's logits differ from the in-memory route's by {diff:.2e} "
                          f"(tolerance {tolerance:.2e} in {str(routed.dtype).removeprefix('torch.')})")


def route_tolerance(dtype: torch.dtype, largest_logit: float) -> float:
    """1e-4 in float32. In 16 bits a folded weight (W·s, rounded once) and the run-time scaling
    (W·x then ·s, each rounded) differ by the dtype's rounding; 8 ulps of the largest logit
    allow for that (bf16, demo models: 0.03–0.09 observed, 0.66 allowed) and still refuse a
    dropped or wrong hop scale (≥ 1.0 there)."""
    if dtype in (torch.float32, torch.float64):
        return 1e-4
    return 8 * torch.finfo(dtype).eps * max(largest_logit, 1.0)
