"""The merge-method registry: each declared method (evomerge.workers.methods) bound to the
tensor function that implements it (evomerge.workers.operators).

The search space, the config checks, the mergekit import/export and the CLI read the
declarations; no other table of parameter names exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from typing import TYPE_CHECKING

from evomerge.workers.methods import METHODS, TRANSFORMS_DECLARED, ParamSpec

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["OPERATORS", "TRANSFORMS", "Operator", "ParamSpec", "Transform", "get_operator", "get_transform",
           "register", "register_transform"]


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


def register(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Bind ``fn`` to the declared merge method ``name`` (KeyError: not declared)."""
    spec = METHODS[name]

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        OPERATORS[name] = Operator(name, fn, spec.params, spec.random, spec.task_vector, spec.experts, spec.doc)
        return fn

    return wrap


def register_transform(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Bind ``fn`` to the declared task-vector transform ``name``."""
    spec = TRANSFORMS_DECLARED[name]

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        TRANSFORMS[name] = Transform(name, fn, spec.params, spec.doc)
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
