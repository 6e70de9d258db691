"""Search spaces of a config, and the stages of a PS+DFS search.

``space: ps`` searches merge recipes, ``space: dfs`` layer routes over the collection, and
``space: ps+dfs`` first runs (or names, with ``dfs.ps_study``) a PS study, then a DFS study
``<study>:dfs`` in the same storage whose collection includes the best PS model as ``ps``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from evomerge.evaluators.batching import planned_batch
from evomerge.search.config import ConfigError, SearchConfig
from evomerge.search.names import DFS_SUFFIX
from evomerge.search.dfs_space import RouteLimits, RouteSpace
from evomerge.search.families import families
from evomerge.search.portfolio import PortfolioSpace
from evomerge.search.space import SearchSpace
from evomerge.workers.recipe import Recipe
from evomerge.workers.sources import read_config

PS_MEMBER = "ps"  # the name of the evolved PS model in a PS+DFS collection


def dfs_study(study: str) -> str:
    return study + DFS_SUFFIX


def ps_space(cfg: SearchConfig, folders: Mapping[str, Path]) -> SearchSpace | PortfolioSpace:
    """One method at one granularity: its space; ``auto`` for either: a portfolio of spaces."""
    num_layers = int(read_config(cfg.base_model, folders[cfg.base_model]).num_hidden_layers)
    m = cfg.merge
    options = dict(points=m.points, transforms=m.transforms, normalize=m.normalize, seed=m.seed, ranges=m.ranges,
                   fixed=m.fixed)
    methods = families(m.method, len(cfg.experts), m.transforms)
    fine = m.granularity == "auto"
    if len(methods) == 1 and not fine:
        space = SearchSpace.build(m.method, cfg.base_model, cfg.experts, num_layers, layout=m.coarse_granularity,
                                  group_size=m.layout_group_size, **options)  # type: ignore[arg-type]
    else:
        try:
            space = PortfolioSpace.build(methods, cfg.base_model, cfg.experts, num_layers,
                                         layout=m.coarse_granularity, group_size=m.layout_group_size, fine=fine,
                                         fine_size=m.group_size, **options)
        except ValueError as exc:  # no family searchable: report it as below
            raise ConfigError(f"merge.method {m.method}: {exc}") from None
    if space.dim == 0:
        raise ConfigError(f"merge.method {m.method}: nothing to search (every parameter is fixed); give a "
                          "parameter a range, or add a transform such as lines")
    return space


def collection(cfg: SearchConfig) -> tuple[str, ...]:
    """The DFS collection, A first: dfs.models, else (PS+DFS) the PS model and the experts,
    else the base model and the experts."""
    if cfg.dfs.models:
        return tuple(cfg.dfs.models)
    return (PS_MEMBER, *cfg.experts) if cfg.space == "ps+dfs" else (cfg.base_model, *cfg.experts)


def route_space(cfg: SearchConfig, folders: Mapping[str, Path], members: Mapping[str, Recipe]) -> RouteSpace:
    """The DFS space of ``cfg``; ``members`` are collection models that are merges."""
    models = collection(cfg)
    missing = [m for m in models if m not in folders and m not in members]
    if missing:
        raise ConfigError(f"dfs.models: {missing[0]!r} is neither a model nor a PS+DFS member")
    base = read_config(cfg.base_model, folders[cfg.base_model])
    counts = tuple(int(read_config(m, folders[m]).num_hidden_layers) if m in folders else int(base.num_hidden_layers)
                   for m in models)
    d = cfg.dfs
    every = RouteSpace(models, counts, d.repeats, d.block, d.pin_ends, d.scale_range, RouteLimits(1)).longest
    limits = RouteLimits(d.max_hops or every, d.memory_gb * 2**30 if d.memory_gb else None,
                         _bytes_per_hop(base, cfg))
    return RouteSpace(models, counts, d.repeats, d.block, d.pin_ends, d.scale_range, limits,
                      tuple(sorted(members.items())), d.scales == "per_hop")


def _bytes_per_hop(config: object, cfg: SearchConfig) -> float:
    """A rough bound on one hop's memory during evaluation: activations of a batch at full
    context (hidden + MLP width) plus its KV cache, in the workers' dtype."""
    hidden = int(getattr(config, "hidden_size"))
    width = int(getattr(config, "intermediate_size", 4 * hidden))
    heads = int(getattr(config, "num_attention_heads"))
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    # auto counts as the CPU's batch: on a GPU the batch found shrinks to what the route leaves
    batch = planned_batch(cfg.evaluation.batch_size)
    tokens = batch * int(getattr(config, "max_position_embeddings", 2048))
    per_value = 2 if cfg.workers.dtype in ("bfloat16", "float16") else 4
    return float(tokens * (2 * hidden + width + 2 * kv * head_dim) * per_value)
