"""What ``merge.method: auto`` and ``merge.granularity: auto`` expand to.

``auto`` (the default) lets the search choose the merge family: one arm per family below,
each searched by its own optimizer from its untuned merge, the budget moved to the families
that lead (search/optimizers/portfolio.py). ``granularity: auto`` searches one gene per expert
first and, once that stagnates, per group of ``merge.group_size`` layers (at most
``MAX_GROUPS`` groups), seeded from the best per-model recipe.
Torch-free: the config validates against these names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from evomerge.workers.methods import method_spec

AUTO = "auto"
# The families auto chooses among, the one whose untuned merge is also tried without each
# expert (leave-one-out) first. Task arithmetic is the plain sum every other family refines;
# TIES, DARE-TIES and Breadcrumbs-TIES sparsify and elect signs; Consensus drops what fewer
# than k experts claim; Model Stock has nothing to search (its merge is a baseline); SLERP
# merges one expert only.
FAMILIES = ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "consensus", "model_stock", "slerp")
MAX_GROUPS = 8  # fine granularity: at most this many layer groups (genes grow with groups x experts)


def families(method: str, experts: int, transforms: Sequence[str] = ()) -> tuple[str, ...]:
    """The methods a config's ``merge.method`` stands for with ``experts`` expert models:
    itself, or (auto) every family that merges that many experts and, with transforms, works
    on task vectors."""
    if method != AUTO:
        return (method,)
    out = []
    for name in FAMILIES:
        spec = method_spec(name)
        low, high = spec.experts
        if experts >= low and (high is None or experts <= high) and (spec.task_vector or not transforms):
            out.append(name)
    return tuple(out)


def known_params(method: str, transforms: Sequence[str] = ()) -> set[str]:
    """Every parameter name a config may give a range or a value for under ``method``
    (auto: any family's, whatever the number of experts)."""
    names = FAMILIES if method == AUTO else (method,)
    return {p.name for n in names for p in method_spec(n).params}


def family_label(method: str, layout: str) -> str:
    """How a recipe's family is named in the leaderboard and the dashboard: ``ties`` at one
    gene per expert, ``ties[layer_group]`` at another granularity."""
    return method if layout == "model" else f"{method}[{layout}]"


def fine_group_size(num_layers: int, group_size: int = 2) -> int:
    """Layers per gene group at the fine granularity: the config's ``group_size`` (default 2),
    or the fewest layers per group that keep at most ``MAX_GROUPS`` groups when that is more
    (genes grow with groups x experts x parameters, and the budget does not)."""
    return max(group_size, math.ceil(num_layers / MAX_GROUPS))
