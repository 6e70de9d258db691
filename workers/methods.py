"""The merge methods and transforms as users see them: names, parameters, bounds, defaults.

No torch here on purpose: the config checks, the search space, ``evomerge methods`` and the
mergekit interop read these declarations without loading a tensor library. Each
declaration names its implementation, a pure tensor function, as ``"module:function"``;
:mod:`evomerge.workers.registry` imports and binds it on first use (tested for every method).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

OPERATORS_MODULE = "evomerge.workers.operators"  # where implementations live unless declared elsewhere


@dataclass(frozen=True)
class ParamSpec:
    """A parameter of an operator or transform.

    ``per_expert`` parameters take one value per expert (weight, density), the others one
    value per merge (SLERP's t, the global scale λ). A parameter that is not ``searched``
    keeps its default unless the config gives it a range (then it is searched) or pins it.
    """

    name: str
    low: float
    high: float
    default: float
    doc: str
    per_expert: bool = True
    searched: bool = True


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its parameters, whether it draws random masks (then it gets a
    generator seeded from the recipe), whether it is base + f(task vectors) (then depth
    transforms such as LiNeS apply), how many experts it merges, and a one-line summary."""

    name: str
    params: tuple[ParamSpec, ...]
    doc: str
    random: bool = False
    task_vector: bool = True
    experts: tuple[int, int | None] = (1, None)
    impl: str = ""  # "module:function"; empty: the function named like the method in OPERATORS_MODULE

    @property
    def target(self) -> str:
        return self.impl or f"{OPERATORS_MODULE}:{self.name}"

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def check_experts(self, n: int) -> None:
        low, high = self.experts
        if n < low or (high is not None and n > high):
            want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ValueError(f"{self.name} merges {want} expert model(s) besides the base, got {n}")


@dataclass(frozen=True)
class TransformSpec:
    """A transform of a task-vector method's result, with its (per-merge) parameters."""

    name: str
    params: tuple[ParamSpec, ...]
    doc: str
    impl: str = ""  # as MethodSpec.impl

    @property
    def target(self) -> str:
        return self.impl or f"{OPERATORS_MODULE}:{self.name}"


class _Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=_Named)


def declare(kind: str, specs: Iterable[N]) -> dict[str, N]:
    """``specs`` by name; a name declared twice is an error, not a silent overwrite."""
    table: dict[str, N] = {}
    for spec in specs:
        if spec.name in table:
            raise ValueError(f"{kind} {spec.name!r} is declared twice")
        table[spec.name] = spec
    return table


WEIGHT = ParamSpec("weight", 0.0, 1.0, 0.5, "scale of the expert's contribution")
DENSITY = ParamSpec("density", 0.0, 1.0, 0.5, "fraction of the task vector kept")
GAMMA = ParamSpec("gamma", 0.0, 0.2, 0.01, "fraction of largest-magnitude outliers removed (Breadcrumbs)")
EPSILON = ParamSpec("epsilon", 0.0, 0.5, 0.15, "spread of DELLA's keep probabilities around the density")
SCALE = ParamSpec("scale", 0.0, 2.0, 1.0, "global scale of the merged task vector (mergekit's lambda)",
                  per_expert=False, searched=False)
T = ParamSpec("t", 0.0, 1.0, 0.5, "interpolation position: 0 is the base, 1 the expert", per_expert=False)
SELECT = ParamSpec("select", 0.0, 1.0, 0.5, "layer swapping: the expert with the highest select above "
                   "0.5 supplies the tensor, else the base")
TALL = ParamSpec("tall", 0.0, 1.0, 0.4, "TALL mask threshold λ_t: expert t claims an entry where "
                 "|w_t δ_t| > λ_t·|τ − w_t δ_t|")
AGREE = ParamSpec("k", 0.0, 4.0, 2.0, "Consensus: entries claimed by fewer experts are dropped (rounded)",
                  per_expert=False, searched=False)
RATIO = ParamSpec("ratio", 0.02, 0.5, 0.1, "PCB: fraction of entries kept after balancing", per_expert=False)
PCB_WEIGHT = ParamSpec("weight", 0.0, 2.0, 1.0, "PCB: scale λ_i of the expert's balanced task vector")

METHODS: dict[str, MethodSpec] = declare("merge method", (
    MethodSpec("linear", (WEIGHT,), "Model soup (Wortsman et al. 2022): the weighted mean of the models; "
               "list the base among them to give it weight.", task_vector=False),
    MethodSpec("task_arithmetic", (WEIGHT, SCALE), "Task arithmetic (Ilharco et al. 2023): the base plus the "
               "weighted sum of the experts' task vectors."),
    MethodSpec("ties", (DENSITY, WEIGHT, SCALE), "TIES (Yadav et al. 2023): task vectors trimmed to their "
               "largest entries, a sign elected per entry, the agreeing entries summed."),
    MethodSpec("dare_linear", (DENSITY, WEIGHT, SCALE), "DARE (Yu et al. 2024): task-vector entries dropped at "
               "random and the rest rescaled, then task arithmetic.", random=True),
    MethodSpec("dare_ties", (DENSITY, WEIGHT, SCALE), "DARE drop and rescale, then TIES sign election: "
               "Sakana's parameter-space setting.", random=True),
    MethodSpec("breadcrumbs", (DENSITY, GAMMA, WEIGHT, SCALE), "Model Breadcrumbs (Davari & Belilovsky 2024): "
               "the largest outliers and the smallest entries masked, then task arithmetic."),
    MethodSpec("breadcrumbs_ties", (DENSITY, GAMMA, WEIGHT, SCALE), "Model Breadcrumbs masks, then TIES sign "
               "election."),
    MethodSpec("della", (DENSITY, EPSILON, WEIGHT, SCALE), "DELLA (Deep et al. 2024): drops with keep "
               "probabilities ranked by magnitude, then TIES sign election and fusion.", random=True),
    MethodSpec("della_linear", (DENSITY, EPSILON, WEIGHT, SCALE), "DELLA's magnitude-ranked drop, then task "
               "arithmetic (no sign election).", random=True),
    MethodSpec("consensus", (TALL, WEIGHT, AGREE, SCALE), "Consensus merging with TALL masks (Wang et al. "
               "2024): entries fewer than k experts claim are dropped from the summed task vector."),
    MethodSpec("pcb", (RATIO, PCB_WEIGHT, SCALE), "PCB merging (Du et al. 2024): task-vector entries scored by "
               "intra- and inter-model balance, the top ratio kept, a score-weighted mean."),
    MethodSpec("slerp", (T,), "Spherical interpolation (Shoemake 1985) between the base and one expert.",
               task_vector=False, experts=(1, 1)),
    MethodSpec("model_stock", (), "Model Stock (Jang et al. 2024): the experts' mean pulled towards the base by "
               "their task vectors' agreement; nothing to search.", task_vector=False, experts=(2, None)),
    MethodSpec("swap", (SELECT,), "Layer swapping (Bandarkar et al. 2024): each tensor copied whole from one "
               "model; per layer with layer-group genes of size 1.", task_vector=False),
))

TRANSFORMS_DECLARED: dict[str, TransformSpec] = declare("transform", (
    TransformSpec("lines", (ParamSpec("alpha", 0.0, 1.0, 0.5, "LiNeS scale of the shallowest layer's task vector",
                                      per_expert=False),
                            ParamSpec("beta", 0.0, 1.5, 0.5, "LiNeS increase of the scale towards the last layer",
                                      per_expert=False)),
                  "LiNeS (Wang et al. 2025): the merged task vector scaled up with depth, so shallow layers "
                  "stay near the base."),
))


def method_spec(name: str) -> MethodSpec:
    """The declaration of merge method ``name`` (KeyError naming the known ones)."""
    return _lookup("merge method", METHODS, name)


def transform_spec(name: str) -> TransformSpec:
    """The declaration of transform ``name`` (KeyError naming the known ones)."""
    return _lookup("transform", TRANSFORMS_DECLARED, name)


def _lookup(kind: str, table: dict[str, N], name: str) -> N:
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r} (known: {', '.join(sorted(table))})") from None
