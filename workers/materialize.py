"""Materialize recipes in place: one model object per worker, its weights rewritten per candidate.

The worker loads its source tensors once. A candidate never copies a whole model: each
parameter of the working model is computed tensor by tensor from the sources and copied
into the existing storage, so an evaluator holding the model (lm-eval's HFLM) sees it.

Where the sources live (:func:`source_placement`): on the worker's device, or, when they and
the working model do not fit there together, in host memory (memory-mapped safetensors, held
once per node by the page cache), each tensor streamed to the device when it is merged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from evomerge.workers.layout import depth_fraction, tensor_seed, value_for
from evomerge.workers.registry import get_operator, get_transform
from evomerge.workers.recipe import MergeRecipe, SourceRecipe
from evomerge.workers.sources import SourceError, load_tensors, model_folder
from evomerge.workers.kernels.precision import widened


Placement = Literal["auto", "device", "host"]
HEADROOM = 0.8  # share of the device memory left free beside the working model that sources may take


def source_placement(choice: Placement, source_bytes: int, free_bytes: int | None) -> Literal["device", "host"]:
    """Where a worker keeps its sources: ``choice`` unless "auto", which keeps them on the
    device when they fit in :data:`HEADROOM` of the memory the working model left free there
    (activations need the rest), else in host memory. ``free_bytes`` None: the device is the
    CPU, where both are host memory."""
    if choice != "auto":
        return choice
    return "device" if free_bytes is None or source_bytes <= HEADROOM * free_bytes else "host"


def load_model(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The working model from ``folder`` in ``dtype``, with PyTorch's scaled-dot-product
    attention (fused kernels on a GPU, no L x L score matrix kept) where the architecture has
    it, else the architecture's own attention."""
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa",
                                                    trust_remote_code=False)
    except ValueError:  # transformers refuses SDPA for an architecture without it
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)


class Materializer:
    """Holds the source tensors and one working model whose weights each recipe rewrites."""

    def __init__(self, folders: Mapping[str, Path], base: str, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", allow_pickle: bool = False, sources: Placement = "auto") -> None:
        self.device = device
        skeleton = model_folder(base, folders[base])  # an adapter source: its base's config and tokenizer
        self.model: PreTrainedModel = load_model(skeleton, dtype).to(device).eval()
        model_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        free = torch.cuda.mem_get_info(torch.device(device))[0] if device.startswith("cuda") else None
        # every source has the working model's tensors (checked below), so its bytes are the model's
        self.placement = source_placement(sources, model_bytes * len(folders), free)
        where = device if self.placement == "device" else "cpu"
        self.sources = {name: load_tensors(name, folder, dtype, where, allow_pickle)
                        for name, folder in folders.items()}
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(skeleton)
        self.num_layers = int(self.model.config.num_hidden_layers)
        self.params = dict(self.model.named_parameters())  # tied weights appear once
        for name, tensors in self.sources.items():
            missing = [key for key in self.params if key not in tensors]
            if missing:
                raise SourceError(f"model {name!r} lacks tensor {missing[0]}")

    @torch.no_grad()
    def apply(self, recipe: SourceRecipe | MergeRecipe) -> None:
        """Rewrite the working model's weights so that it is ``recipe``'s model."""
        for name in recipe.sources():
            self._check_known(name)
        if isinstance(recipe, SourceRecipe):
            for key, param in self.params.items():
                param.copy_(self.sources[recipe.source][key])
            return
        for key, param in self.params.items():
            self.merge_tensor(recipe, key, out=param.data)
            # one cheap reduction; NaN/inf anywhere makes the sum non-finite
            if not bool(torch.isfinite(param.data.sum())) and not bool(torch.isfinite(param.data).all()):
                raise FloatingPointError(f"merged tensor {key} holds NaN or inf")

    def merge_tensor(self, recipe: MergeRecipe, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The merged value of one tensor under a complete ``recipe`` (written into ``out`` if given)."""
        op = get_operator(recipe.method)
        kwargs: dict[str, object] = {}
        for spec in op.params:
            if spec.per_expert:
                kwargs[spec.name] = tuple(self._value(recipe, recipe.params[spec.name][m], key)
                                          for m in recipe.models)
            else:
                kwargs[spec.name] = self._value(recipe, recipe.shared[spec.name], key)
        generator = None
        if op.random:
            # on the host whatever the device: a draw is two integers per expert (a counter-hash key,
            # workers/sparsify.Stream), the masks are computed where the tensors are, without a sync
            generator = torch.Generator().manual_seed(tensor_seed(recipe.seed, key))
        base = self.on_device(self.sources[recipe.base][key])
        experts = [self.on_device(self.sources[m][key]) for m in recipe.models]
        if not recipe.transforms:
            return op.fn(base, experts, normalize=recipe.normalize, generator=generator, out=out, **kwargs)
        dtype = base.dtype  # 16-bit: merge and transform in float32, round once
        base, experts = widened(base, experts)
        merged = op.fn(base, experts, normalize=recipe.normalize, generator=generator,
                       out=out if base.dtype == dtype else None, **kwargs)
        for name in recipe.transforms:
            transform = get_transform(name)
            values = {p.name: recipe.shared[p.name][0] for p in transform.params}
            merged = transform.fn(merged, base, depth_fraction(key, self.num_layers), **values)
        if out is None:
            return merged.to(dtype)
        return out if merged is out else out.copy_(merged)

    def on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the worker's device: itself when the sources live there, else a copy
        streamed from host memory (one tensor at a time: the device never holds all sources)."""
        return tensor if self.placement == "device" else tensor.to(self.device)

    def source_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Source ``name``'s tensors on the device (shared when they live there, copied from
        host memory otherwise): what a layer route built from them computes with."""
        tensors = self.sources[name]
        return tensors if self.placement == "device" else {k: self.on_device(v) for k, v in tensors.items()}

    def _value(self, recipe: MergeRecipe, values: tuple[float, ...], key: str) -> float:
        return value_for(values, key, self.num_layers, recipe.layout, recipe.group_size)

    def _check_known(self, name: str) -> None:
        if name not in self.sources:
            raise KeyError(f"recipe names model {name!r}, not among the sources {sorted(self.sources)}")
