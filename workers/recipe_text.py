"""A recipe as one line of text (leaderboards, notes), from its JSON form.

Plain functions over the stored JSON (workers/recipe.py's stored document), so the
quick CLI commands can show recipes without loading pydantic's model machinery;
a recipe's ``summary`` and a route's ``path_text`` are these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

_SHORT = {"weight": "w", "density": "d"}


def summary(recipe: Mapping[str, Any]) -> str:
    """A short human-readable line: the source, the route, or the method with its values."""
    label = recipe.get("label") or ""
    return _SUMMARY[recipe["kind"]](recipe, f"{label}: " if label else "")


def _source(recipe: Mapping[str, Any], head: str) -> str:
    return f"source {recipe.get('source')}"  # the label says no more than the source's name


def _route(recipe: Mapping[str, Any], head: str) -> str:
    models = recipe.get("models") or ()
    legend = ", ".join(f"{chr(65 + i)}={m}" for i, m in enumerate(models))
    route = recipe.get("route") or ()
    return f"{head}route of {len(route)} hops: {path_text(models, route, recipe.get('scales') or ())} ({legend})"


def _merge(recipe: Mapping[str, Any], head: str) -> str:
    params: Mapping[str, Mapping[str, Sequence[float]]] = recipe.get("params") or {}
    parts = [f"{model}(" + " ".join(f"{_SHORT.get(p, p)}={_fmt(params[p][model])}" for p in sorted(params)) + ")"
             for model in recipe.get("models") or ()]
    parts += [f"{p}={_fmt(v)}" for p, v in sorted((recipe.get("shared") or {}).items())]
    method = "+".join((recipe.get("method") or "", *(recipe.get("transforms") or ())))
    return f"{head}{method} " + " ".join(parts)


_SUMMARY: dict[str, Callable[[Mapping[str, Any], str], str]] = {"source": _source, "route": _route, "merge": _merge}


def path_text(models: Sequence[str], route: Sequence[Sequence[Any]], scales: Sequence[float],
              decimals: int = 2) -> str:
    """``A0 A1 B2×0.83 ...``: each hop as its model's letter (order of ``models``) and layer,
    with its scale where it is not 1."""
    letters = {m: chr(65 + i) for i, m in enumerate(models)}
    parts = []
    for (model, layer), scale in zip(route, scales):
        tag = f"{letters[model]}{layer}"
        parts.append(tag if abs(scale - 1.0) < 0.5 * 10 ** -decimals else f"{tag}×{scale:.{decimals}f}")
    return " ".join(parts)


def _fmt(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return "[" + ",".join(f"{v:.2f}" for v in values) + "]"
