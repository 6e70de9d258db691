"""Pictures of a study as plotly figures, for optuna-dashboard to show.

A figure here is plotly's JSON form (``data`` traces and a ``layout``), built from plain
dicts: the dashboard draws it with plotly.js, so the controller needs no plotting library.
:class:`Figure` has the ``to_json`` that ``optuna_dashboard.save_plotly_graph_object``
calls. Everything here is a pure function of the stored candidates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.search.ranking import best_candidate
from evomerge.search.origins import evolved
from evomerge.storage.kinds import State
from evomerge.storage.repository import CandidateRecord
from evomerge.workers.layout import MODULES
from evomerge.workers.recipe import MergeRecipe, Recipe, RouteRecipe, parse_recipe

_HEIGHT = 420


@dataclass(frozen=True)
class Figure:
    """One plotly figure: ``id`` names it in the study (a later save replaces it)."""

    id: str
    title: str
    data: tuple[dict[str, Any], ...]
    layout: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Plotly's figure JSON (what ``plotly.graph_objects.Figure.to_json`` writes)."""
        layout = {"title": {"text": self.title}, "height": _HEIGHT, "margin": {"t": 60, "r": 20},
                  "legend": {"orientation": "h", "y": -0.2}, **self.layout}
        return json.dumps({"data": list(self.data), "layout": layout})


def study_figures(cands: Sequence[CandidateRecord]) -> list[Figure]:
    """Fitness over time against the baselines, and the best evolved recipe's picture (its
    genes layer by layer for a merge, its path for a route). Empty before any result."""
    out = []
    history = fitness_history(cands)
    if history is not None:
        out.append(history)
    best = best_candidate([c for c in cands if evolved(c)])
    if best is not None:
        recipe = parse_recipe(best.recipe_json)
        title = f"Best evolved recipe, trial {best.trial_number} (fitness {best.fitness:.4f})"
        picture = route_figure(recipe, title) if isinstance(recipe, RouteRecipe) else genes_figure(recipe, title)
        if picture is not None:
            out.append(picture)
    return out


def fitness_history(cands: Sequence[CandidateRecord]) -> Figure | None:
    """Each evolved trial's fitness by trial number, the best so far, held-out re-scores,
    and one horizontal line per baseline (source models and untuned merges)."""
    done = sorted((c for c in cands if c.state == State.COMPLETE and c.fitness is not None
                   and c.trial_number is not None), key=lambda c: c.trial_number or 0)
    if not done:
        return None
    proposed = [c for c in done if evolved(c)]
    xs = [c.trial_number for c in done]
    span = [min(xs), max(xs)] if len(set(xs)) > 1 else [xs[0] - 0.5, xs[0] + 0.5]
    data: list[dict[str, Any]] = []
    for c in done:
        if not evolved(c) and c.duplicate_of is None:
            label = parse_recipe(c.recipe_json).label or c.origin
            data.append({"type": "scatter", "mode": "lines", "x": span, "y": [c.fitness, c.fitness],
                         "name": f"{label} (trial {c.trial_number})", "line": {"dash": "dash", "width": 1}})
    if proposed:
        best, running = [], float("-inf")
        for c in proposed:
            running = max(running, c.fitness or float("-inf"))
            best.append(running)
        data.append({"type": "scatter", "mode": "markers", "name": "evolved trial",
                     "x": [c.trial_number for c in proposed], "y": [c.fitness for c in proposed],
                     "text": [parse_recipe(c.recipe_json).summary()[:120] for c in proposed],
                     "marker": {"size": 6, "opacity": 0.6}})
        data.append({"type": "scatter", "mode": "lines", "name": "best so far", "line": {"shape": "hv", "width": 3},
                     "x": [c.trial_number for c in proposed], "y": best})
    heldout = [c for c in done if c.heldout_fitness is not None]
    if heldout:
        data.append({"type": "scatter", "mode": "markers", "name": "held-out re-score",
                     "x": [c.trial_number for c in heldout], "y": [c.heldout_fitness for c in heldout],
                     "marker": {"symbol": "diamond", "size": 10}})
    return Figure("evomerge-fitness", "Fitness over trials against the baselines", tuple(data),
                  {"xaxis": {"title": {"text": "trial"}}, "yaxis": {"title": {"text": "fitness (search split)"}}})


def value_labels(recipe: Recipe, count: int) -> list[str]:
    """What each of a parameter's ``count`` values governs under the recipe's layout."""
    if count == 1:
        return ["every layer"]
    if recipe.layout == "layer_group":
        size = recipe.group_size or 1
        return [f"layers {i * size}-{(i + 1) * size - 1}" for i in range(count - 1)] + ["embeddings, norm, head"]
    if recipe.layout == "module":
        return list(MODULES[:count])
    if recipe.layout == "depth":
        return [f"depth {i / (count - 1):.2f}" for i in range(count)]
    return [f"value {i}" for i in range(count)]


def genes_figure(recipe: Recipe, title: str) -> Figure | None:
    """A merge recipe's parameters (weights, densities, ...) per expert, value by value along
    its layout (layer groups, module types or depth anchors); None for a source model."""
    if not isinstance(recipe, MergeRecipe) or not (recipe.params or recipe.shared):
        return None
    series = [(f"{model} {name}", recipe.params[name][model], name)
              for name in sorted(recipe.params) for model in recipe.models]
    series += [(f"{name} (shared)", values, name) for name, values in sorted(recipe.shared.items())]
    count = max(len(values) for _, values, _ in series)
    method = "+".join((recipe.method, *recipe.transforms))
    if count == 1:  # one value per expert: bars, one group per parameter
        bars = tuple({"type": "bar", "name": name, "x": [param], "y": [values[0]], "text": [f"{values[0]:.3f}"]}
                     for name, values, param in series)
        return Figure("evomerge-best-recipe", f"{title}: {method} genes", bars,
                      {"barmode": "group", "yaxis": {"title": {"text": "value (every layer)"}}})
    labels = value_labels(recipe, count)
    dashes = {name: dash for name, dash in zip(sorted({n for _, _, n in series}), ("solid", "dot", "dash", "dashdot"))}
    data = tuple({"type": "scatter", "mode": "lines+markers", "name": name, "x": labels,
                  "y": list(values) * count if len(values) == 1 else list(values),
                  "line": {"dash": dashes.get(param, "solid")}}
                 for name, values, param in series)
    return Figure("evomerge-best-recipe", f"{title}: {method} genes", data,
                  {"xaxis": {"title": {"text": f"layout: {recipe.layout}"}, "type": "category"},
                   "yaxis": {"title": {"text": "value"}}})


def route_figure(recipe: Recipe, title: str) -> Figure | None:
    """A route recipe's path: the source layer of every hop (one colour per model), with
    the hop's scale as the marker's size and label."""
    if not isinstance(recipe, RouteRecipe) or not recipe.route:
        return None
    order = sorted({(recipe.models.index(m), layer, m) for m, layer in recipe.route})
    categories = [f"{m} L{layer}" for _, layer, m in order]
    data = [{"type": "scatter", "mode": "lines", "name": "path", "x": list(range(len(recipe.route))),
             "y": [f"{m} L{layer}" for m, layer in recipe.route], "line": {"color": "lightgray"},
             "showlegend": False}]
    for model in recipe.models:
        hops = [(i, layer, s) for i, ((m, layer), s) in enumerate(zip(recipe.route, recipe.scales)) if m == model]
        if hops:
            data.append({"type": "scatter", "mode": "markers", "name": model, "x": [i for i, _, _ in hops],
                         "y": [f"{model} L{layer}" for _, layer, _ in hops],
                         "text": [f"hop {i}: scale {s:.3f}" for i, _, s in hops],
                         "marker": {"size": [6 + 8 * min(abs(s), 2.0) for _, _, s in hops]}})
    return Figure("evomerge-best-recipe", f"{title}: route of {len(recipe.route)} hops", tuple(data),
                  {"xaxis": {"title": {"text": "hop"}},
                   "yaxis": {"title": {"text": "source layer"}, "type": "category",
                             "categoryorder": "array", "categoryarray": categories}})
