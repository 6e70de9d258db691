"""The merge-method registry: operators and transforms declare their parameters here.

The search space, the config checks, the mergekit import/export and the CLI all read
these declarations; no other table of parameter names exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


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
class Operator:
    """A registered merge method: one pure function merging one tensor.

    ``fn(base, experts, *, normalize, generator, out, **params)`` gets the base tensor, the
    experts' tensors (same shape and dtype) and the parameters' values for this tensor: a
    tuple per expert for per-expert parameters, a float otherwise. It returns the merged
    tensor, written into ``out`` when given, and never modifies its inputs.
    """

    name: str
    fn: Callable[..., Tensor]
    params: tuple[ParamSpec, ...]
    random: bool  # draws random masks: gets a generator seeded from the recipe
    task_vector: bool  # base + f(task vectors): depth transforms (LiNeS) apply
    experts: tuple[int, int | None]  # allowed number of experts (min, max)
    doc: str

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def check_experts(self, n: int) -> None:
        low, high = self.experts
        if n < low or (high is not None and n > high):
            want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ValueError(f"{self.name} merges {want} expert model(s) besides the base, got {n}")


@dataclass(frozen=True)
class Transform:
    """A transform of a task-vector operator's result: ``fn(merged, base, depth, **params)``.

    ``merged`` is the operator's result for one tensor (a buffer the caller owns: the
    transform may rewrite it and return it), ``base`` the base tensor, ``depth`` the
    tensor's place in [0, 1] (:func:`workers.layout.depth_fraction`). Its parameters hold
    one value per merge.
    """

    name: str
    fn: Callable[..., Tensor]
    params: tuple[ParamSpec, ...]
    doc: str


OPERATORS: dict[str, Operator] = {}
TRANSFORMS: dict[str, Transform] = {}


def register(name: str, *params: ParamSpec, random: bool = False, task_vector: bool = True,
             experts: tuple[int, int | None] = (1, None)) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn`` as merge method ``name`` with its parameters."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        OPERATORS[name] = Operator(name, fn, tuple(params), random, task_vector, experts,
                                   (fn.__doc__ or "").strip())
        return fn

    return wrap


def register_transform(name: str, *params: ParamSpec) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn`` as the task-vector transform ``name``."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        TRANSFORMS[name] = Transform(name, fn, tuple(params), (fn.__doc__ or "").strip())
        return fn

    return wrap


def get_operator(name: str) -> Operator:
    try:
        return OPERATORS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r} (known: {', '.join(sorted(OPERATORS))})") from None


def get_transform(name: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise KeyError(f"unknown transform {name!r} (known: {', '.join(sorted(TRANSFORMS))})") from None
