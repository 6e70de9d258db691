"""The merge-method registry: each declared method (evomerge.workers.methods) bound to the
tensor function that implements it.

Declarations come first and carry no torch: the search space, the config checks, the
mergekit interop and the CLI read :data:`~evomerge.workers.methods.METHODS`. The
implementation named by a declaration's ``"module:function"`` is imported on first use of
that method here, so importing this module loads no tensor library, and nothing is
registered by the side effect of importing another module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from evomerge.workers.methods import METHODS, TRANSFORMS_DECLARED, MethodSpec, ParamSpec, TransformSpec

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["OPERATORS", "TRANSFORMS", "Operator", "ParamSpec", "Transform", "get_operator", "get_transform"]


@dataclass(frozen=True, kw_only=True)
class Operator(MethodSpec):
    """A declared merge method bound to its pure function, merging one tensor.

    ``fn(base, experts, *, normalize, generator, out, **params)`` gets the base tensor, the
    experts' tensors (same shape and dtype) and the parameters' values for this tensor: a
    tuple per expert for per-expert parameters, a float otherwise. It returns the merged
    tensor, written into ``out`` when given, and never modifies its inputs.
    """

    fn: Callable[..., Tensor]


@dataclass(frozen=True, kw_only=True)
class Transform(TransformSpec):
    """A transform of a task-vector operator's result: ``fn(merged, base, depth, **params)``.

    ``merged`` is the operator's result for one tensor (a buffer the caller owns: the
    transform may rewrite it and return it), ``base`` the base tensor, ``depth`` the
    tensor's place in [0, 1] (:func:`workers.layout.depth_fraction`). Its parameters hold
    one value per merge.
    """

    fn: Callable[..., Tensor]


S = TypeVar("S", MethodSpec, TransformSpec)
B = TypeVar("B", Operator, Transform)


def _load(target: str) -> Callable[..., Tensor]:
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ImportError(f"{target}: no such function (a declaration in evomerge.workers.methods names it)")
    return fn


class Bound(Mapping[str, B], Generic[S, B]):
    """The declarations of one kind, each bound to its implementation when first looked up.

    A read-only mapping from name to the bound record; an unknown name is a KeyError that
    lists the known ones.
    """

    def __init__(self, kind: str, declared: Mapping[str, S], bind: Callable[..., B]) -> None:
        self._kind, self._declared, self._bind = kind, declared, bind
        self._bound: dict[str, B] = {}

    def __getitem__(self, name: str) -> B:
        if name not in self._bound:
            spec = self._declared.get(name)
            if spec is None:
                raise KeyError(f"unknown {self._kind} {name!r} (known: {', '.join(sorted(self._declared))})")
            fields = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
            self._bound[name] = self._bind(**fields, fn=_load(spec.target))
        return self._bound[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._declared)

    def __len__(self) -> int:
        return len(self._declared)

    def __contains__(self, name: object) -> bool:  # no binding needed to answer
        return name in self._declared


OPERATORS: Bound[MethodSpec, Operator] = Bound("merge method", METHODS, Operator)
TRANSFORMS: Bound[TransformSpec, Transform] = Bound("transform", TRANSFORMS_DECLARED, Transform)


def get_operator(name: str) -> Operator:
    """The operator declared as ``name``, bound to its function (KeyError: not declared)."""
    return OPERATORS[name]


def get_transform(name: str) -> Transform:
    """The transform declared as ``name``, bound to its function (KeyError: not declared)."""
    return TRANSFORMS[name]
