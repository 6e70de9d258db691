"""The study's figures (search/app/plots.py) as plotly JSON: what each trace holds, from real
recipes and candidate records. The browser test shows them drawn."""

from __future__ import annotations

import json

from evomerge.search.app.plots import fitness_history, genes_figure, route_figure, study_figures
from evomerge.storage.repository import CandidateRecord
from evomerge.workers.recipe import MergeRecipe, Recipe, RouteRecipe, SourceRecipe


def _cand(cid: int, origin: str, recipe: Recipe, fitness: float | None, heldout: float | None = None) -> CandidateRecord:
    return CandidateRecord(id=cid, trial_number=cid - 1, origin=origin, generation=None, genes=None,
                           recipe_json=recipe.to_json(), recipe_hash=recipe.content_hash,
                           state="complete" if fitness is not None else "failed", duplicate_of=None,
                           scores=None, fitness=fitness, heldout=None, heldout_fitness=heldout, materialize_s=None,
                           evaluate_s=None, worker=None, attempt=1, error=None)


def _merge(a: tuple[float, ...], b: tuple[float, ...], **kw: object) -> Recipe:
    return MergeRecipe(method="ties", base="base", models=("a", "b"),
                  params={"weight": {"a": a, "b": b}, "density": {"a": (0.5,), "b": (0.7,)}}, **kw)


def test_fitness_history_has_baselines_best_so_far_and_heldout() -> None:
    cands = [_cand(1, "source", SourceRecipe(source="a", label="source a"), 0.4),
             _cand(2, "cma", _merge((1.0,), (0.5,)), 0.3),
             _cand(3, "cma", _merge((1.2,), (0.5,)), 0.6, heldout=0.55),
             _cand(4, "cma", _merge((0.2,), (0.5,)), None),
             _cand(5, "cma", _merge((0.9,), (0.5,)), 0.5)]
    fig = fitness_history(cands)
    assert fig is not None
    traces = {t["name"]: t for t in json.loads(fig.to_json())["data"]}
    assert traces["source a (trial 0)"]["y"] == [0.4, 0.4]  # a baseline: a horizontal line
    assert traces["evolved trial"]["x"] == [1, 2, 4] and traces["evolved trial"]["y"] == [0.3, 0.6, 0.5]
    assert traces["best so far"]["y"] == [0.3, 0.6, 0.6]
    assert traces["held-out re-score"]["x"] == [2] and traces["held-out re-score"]["y"] == [0.55]
    # The best evolved recipe is pictured, not the better baseline.
    assert [f.title for f in study_figures(cands)][1].startswith("Best evolved recipe, trial 2")


def test_layer_group_genes_follow_the_layout() -> None:
    recipe = _merge((1.0, 0.8, 0.1), (0.2, 0.4, 0.6), layout="layer_group", group_size=2)
    fig = genes_figure(recipe, "best")
    assert fig is not None
    traces = {t["name"]: t for t in json.loads(fig.to_json())["data"]}
    assert traces["a weight"]["x"] == ["layers 0-1", "layers 2-3", "embeddings, norm, head"]
    assert traces["a weight"]["y"] == [1.0, 0.8, 0.1] and traces["b weight"]["y"] == [0.2, 0.4, 0.6]
    assert traces["b density"]["y"] == [0.7, 0.7, 0.7]  # a constant is the same at every layer
    assert genes_figure(SourceRecipe(source="a"), "best") is None


def test_route_figure_shows_each_hop_with_its_scale() -> None:
    recipe = RouteRecipe(base="A", models=("A", "B"), route=(("A", 0), ("B", 1), ("A", 1), ("B", 1)),
                    scales=(1.0, 0.5, 1.5, 1.0))
    fig = route_figure(recipe, "best")
    assert fig is not None
    data = json.loads(fig.to_json())
    traces = {t["name"]: t for t in data["data"]}
    assert traces["path"]["y"] == ["A L0", "B L1", "A L1", "B L1"]
    assert traces["A"]["x"] == [0, 2] and traces["B"]["x"] == [1, 3]
    assert traces["B"]["text"] == ["hop 1: scale 0.500", "hop 3: scale 1.000"]
    assert data["layout"]["yaxis"]["categoryarray"] == ["A L0", "A L1", "B L1"]
