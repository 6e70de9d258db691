"""Materialize recipes in place: one model object per worker, its weights rewritten per candidate.

The worker loads its source tensors once. A candidate never copies a whole model: each
parameter of the working model is computed tensor by tensor from the sources and copied
into the existing storage, so an evaluator holding the model (lm-eval's HFLM) sees it.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from workers.operators import get_operator
from workers.recipe import Recipe
from workers.sources import SourceError, load_tensors

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """Decoder layer of a tensor (``model.layers.3.mlp...`` -> 3), or None outside layers."""
    match = _LAYER.search(tensor_name)
    return int(match.group(1)) if match else None


def num_gene_groups(num_layers: int, group_size: int | None) -> int:
    """Gene groups per parameter and expert: 1 per model, else layer groups + 1 non-layer group."""
    if group_size is None:
        return 1
    return -(-num_layers // group_size) + 1


def gene_group(tensor_name: str, num_layers: int, group_size: int | None) -> int:
    """Which gene group governs a tensor (the last group holds embeddings, norms, head)."""
    if group_size is None:
        return 0
    layer = layer_index(tensor_name)
    if layer is None:
        return num_gene_groups(num_layers, group_size) - 1
    return layer // group_size


def tensor_seed(recipe_seed: int, tensor_name: str) -> int:
    """A per-tensor seed: random masks do not depend on the order tensors are visited."""
    return (recipe_seed * 1_000_003 + zlib.crc32(tensor_name.encode())) % (2**63)


class Materializer:
    """Holds the source tensors and one working model whose weights each recipe rewrites."""

    def __init__(self, folders: Mapping[str, Path], base: str, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> None:
        self.device = device
        self.sources = {name: load_tensors(name, folder, dtype, device) for name, folder in folders.items()}
        self.model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            folders[base], dtype=dtype, trust_remote_code=False).to(device).eval()
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(folders[base])
        self.num_layers = int(self.model.config.num_hidden_layers)
        self.params = dict(self.model.named_parameters())  # tied weights appear once
        for name, tensors in self.sources.items():
            missing = [key for key in self.params if key not in tensors]
            if missing:
                raise SourceError(f"model {name!r} lacks tensor {missing[0]}")

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> None:
        """Rewrite the working model's weights so that it is ``recipe``'s model."""
        if recipe.kind == "source":
            self._check_known(recipe.source or "")
            for key, param in self.params.items():
                param.copy_(self.sources[recipe.source or ""][key])
            return
        for name in (recipe.base or "", *recipe.models):
            self._check_known(name)
        for key, param in self.params.items():
            merged = self.merge_tensor(recipe, key)
            if not bool(torch.isfinite(merged).all()):
                raise FloatingPointError(f"merged tensor {key} holds NaN or inf")
            param.copy_(merged)

    def merge_tensor(self, recipe: Recipe, key: str) -> torch.Tensor:
        """The merged value of one tensor under ``recipe``."""
        op = get_operator(recipe.method or "")
        group = gene_group(key, self.num_layers, recipe.group_size)
        values = {p: [recipe.value(p, m, group) for m in recipe.models] for p in op.param_names}
        generator = None
        if op.random:
            generator = torch.Generator(device=self.device).manual_seed(tensor_seed(recipe.seed, key))
        base = self.sources[recipe.base or ""][key]
        experts = [self.sources[m][key] for m in recipe.models]
        return op.fn(base, experts, normalize=recipe.normalize, generator=generator, **values)

    def _check_known(self, name: str) -> None:
        if name not in self.sources:
            raise KeyError(f"recipe names model {name!r}, not among the sources {sorted(self.sources)}")
