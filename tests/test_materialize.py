"""In-place materialization on real tiny models: gene groups, sources, random operators."""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.workers.layout import layer_index
from evomerge.workers.materialize import Materializer
from evomerge.workers.recipe import MergeRecipe, Recipe, SourceRecipe


def test_layer_groups_apply_their_own_genes(tiny_models: dict[str, Path]) -> None:
    mat = Materializer({k: tiny_models[k] for k in ("base", "a")}, "base")
    storage_before = {k: p.data_ptr() for k, p in mat.params.items()}
    # 2 layers, groups of 1: genes [layer0, layer1, non-layer] = weights [1, 0, 0.5].
    recipe = MergeRecipe(method="task_arithmetic", base="base", models=("a",),
                    params={"weight": {"a": (1.0, 0.0, 0.5)}}, shared={"scale": (1.0,)},
                    layout="layer_group", group_size=1)
    mat.apply(recipe)
    base, expert = mat.sources["base"], mat.sources["a"]
    for key, param in mat.params.items():
        layer = layer_index(key)
        w = {0: 1.0, 1: 0.0, None: 0.5}[layer]
        torch.testing.assert_close(param.detach(), base[key] + w * (expert[key] - base[key]))
    # Weights were rewritten in place: the model an evaluator holds sees them.
    assert {k: p.data_ptr() for k, p in mat.params.items()} == storage_before


def test_source_recipe_and_seeded_dare(tiny_models: dict[str, Path]) -> None:
    mat = Materializer({k: tiny_models[k] for k in ("base", "a", "b")}, "base")
    mat.apply(SourceRecipe(source="b"))
    for key, param in mat.params.items():
        assert torch.equal(param.detach(), mat.sources["b"][key])
    recipe = MergeRecipe(method="dare_ties", base="base", models=("a", "b"),
                    params={"density": {"a": (0.3,), "b": (0.6,)}, "weight": {"a": (0.8,), "b": (0.9,)}},
                    shared={"scale": (1.0,)}, seed=5)
    mat.apply(recipe)
    first = {k: p.detach().clone() for k, p in mat.params.items()}
    mat.apply(SourceRecipe(source="a"))
    mat.apply(recipe)  # the same recipe again: bit-identical, whatever ran in between
    assert all(torch.equal(first[k], p.detach()) for k, p in mat.params.items())
    mat.apply(recipe.model_copy(update={"seed": 6}))
    assert any(not torch.equal(first[k], p.detach()) for k, p in mat.params.items())
