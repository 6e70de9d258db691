"""What a layer route is, and which models can share one, without the engine: the controller
checks a DFS config's models with this before any work (workers/routing.py runs routes)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Config fields that must agree for layers of two models to run in one residual stream.
ROUTE_FIELDS = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "rms_norm_eps",
                "hidden_act", "sliding_window")  # sliding_window: the mask is the head's, the window the layer's


class RouteError(ValueError):
    """A route that cannot be built or run; one line."""


@dataclass(frozen=True)
class Route:
    """A path: ``hops[k]`` = (model, layer), ``scales[k]`` for hop k (see the module docstring)."""

    head: str
    hops: tuple[tuple[str, int], ...]
    scales: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.hops:
            raise RouteError("empty path: a route needs at least one layer")
        if len(self.scales) != len(self.hops):
            raise RouteError(f"{len(self.hops)} hops but {len(self.scales)} scales")


def check_routable(configs: Mapping[str, PretrainedConfig], head: str) -> None:
    """Refuse models whose layers cannot share a residual stream (one line naming the field)."""
    ref = configs[head]
    for name, cfg in configs.items():
        for field in ROUTE_FIELDS:
            a, b = getattr(ref, field, None), getattr(cfg, field, None)
            if a != b:
                raise RouteError(f"models {head!r} and {name!r} cannot be routed together: config {field} "
                                 f"differs ({a} vs {b})")
