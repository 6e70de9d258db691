"""Gene layouts: which value of a parameter governs which tensor.

A recipe gives each parameter a tuple of values per expert. The recipe's layout says how
a tensor picks its value from that tuple:

- ``model``: one value for every tensor;
- ``layer_group``: one value per group of ``group_size`` decoder layers, then one for the
  tensors outside the layers (embeddings, final norm, head);
- ``module``: one value per module type: attention, MLP, everything else (embeddings, norms, head);
- ``depth``: anchors spread evenly over the decoder layers and interpolated linearly
  between them (mergekit's "gradient" lists); tensors outside the layers (embeddings,
  final norm, head) take the first anchor, as in mergekit.

A tuple of one value is a constant under every layout.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Literal

LayoutKind = Literal["model", "layer_group", "module", "depth"]
MODULES = ("attention", "mlp", "other")

_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
_ATTENTION = re.compile(r"\.(?:self_attn|attention|attn)\.")
_MLP = re.compile(r"\.(?:mlp|feed_forward|ffn)\.")


def layer_index(tensor_name: str) -> int | None:
    """Decoder layer of a tensor (``model.layers.3.mlp...`` -> 3), or None outside layers."""
    match = _LAYER.search(tensor_name)
    return int(match.group(1)) if match else None


def module_kind(tensor_name: str) -> str:
    """``attention``, ``mlp`` or ``other`` (embeddings, layer norms, final norm, head)."""
    if layer_index(tensor_name) is not None:
        if _ATTENTION.search(tensor_name):
            return "attention"
        if _MLP.search(tensor_name):
            return "mlp"
    return "other"


def depth_fraction(tensor_name: str, num_layers: int) -> float:
    """Where a tensor sits in depth, in [0, 1]: layer ℓ at ℓ/(L−1) (the only layer of a 1-layer
    model at 1, as in mergekit); every tensor outside the layers at 0 (mergekit's gradients
    and the LiNeS code both treat them so)."""
    layer = layer_index(tensor_name)
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def num_values(layout: LayoutKind, num_layers: int, group_size: int | None = None, points: int = 1) -> int:
    """How many values per parameter and expert a layout holds (before collapsing to one)."""
    if layout == "model":
        return 1
    if layout == "layer_group":
        if group_size is None or group_size < 1:
            raise ValueError("a layer_group layout needs group_size >= 1")
        return -(-num_layers // group_size) + 1
    if layout == "module":
        return len(MODULES)
    return points


def value_for(values: Sequence[float], tensor_name: str, num_layers: int, layout: LayoutKind,
              group_size: int | None = None) -> float:
    """The value of a parameter for one tensor under a layout."""
    if len(values) == 1:
        return float(values[0])
    if layout == "layer_group":
        layer = layer_index(tensor_name)
        return float(values[-1] if layer is None else values[layer // (group_size or 1)])
    if layout == "module":
        return float(values[MODULES.index(module_kind(tensor_name))])
    if layout == "depth":
        import numpy as np  # here, not at the top: the CLI's reading commands load recipes

        anchors = np.linspace(0.0, 1.0, len(values))
        return float(np.interp(depth_fraction(tensor_name, num_layers), anchors, np.asarray(values, dtype=float)))
    raise ValueError(f"layout {layout!r} takes a single value per parameter, got {len(values)}")


def tensor_seed(recipe_seed: int, tensor_name: str) -> int:
    """A per-tensor seed: random masks do not depend on the order tensors are visited."""
    return (recipe_seed * 1_000_003 + zlib.crc32(tensor_name.encode())) % (2**63)
