"""Recipe values, the gene <-> recipe mapping, and the resumable asynchronous CMA-ES."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.search.optimizers.base import default_popsize
from evomerge.search.optimizers.cmaes import AsyncCMA
from evomerge.search.space import SearchSpace
from evomerge.workers.layout import num_values, value_for
from evomerge.workers.recipe import MergeRecipe, parse_recipe, recipe_from


def _space(group_size: int | None = None) -> SearchSpace:
    return SearchSpace.build("dare_ties", "base", ["add", "sub"], num_layers=4,
                             layout="layer_group" if group_size else "model", group_size=group_size,
                             seed=3, ranges={"weight": (0.0, 2.0)})


def test_genes_come_from_operator_declarations() -> None:
    space = _space()
    assert space.names() == ["add.density", "add.weight", "sub.density", "sub.weight"]
    grouped = _space(group_size=2)
    assert grouped.groups == 3 and grouped.dim == 12  # 2 layer groups + 1 non-layer group, x2 params x2 experts
    assert "add.density[2]" in grouped.names()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=12, max_size=12), st.sampled_from([None, 2]))
def test_encode_decode_round_trip(genes: list[float], group_size: int | None) -> None:
    space = _space(group_size)
    x = np.asarray(genes[: space.dim])
    recipe = space.decode(x)
    np.testing.assert_allclose(space.encode(recipe), x, atol=1e-5)
    again = parse_recipe(recipe.to_json())
    assert again == recipe and again.content_hash == recipe.content_hash
    assert space.decode(space.encode(recipe)) == recipe  # decoding is a fixed point


def test_decode_clips_and_maps_ranges() -> None:
    space = _space()
    recipe = space.decode([1.5, 1.0, -0.2, 0.25])
    assert recipe.params["density"] == {"add": (1.0,), "sub": (0.0,)}
    assert recipe.params["weight"] == {"add": (2.0,), "sub": (0.5,)}
    assert space.box_violation([1.5, 1.0, -0.2, 0.25]) == pytest.approx(0.25 + 0.04)


def test_hash_ignores_label_but_not_values() -> None:
    space = _space()
    a = space.decode([0.5] * 4)
    assert a.content_hash == space.decode([0.5] * 4, label="untuned").content_hash
    assert a.content_hash != space.decode([0.5, 0.5, 0.5, 0.6]).content_hash


def test_recipe_validation() -> None:
    with pytest.raises(ValueError):
        MergeRecipe(method="ties", base="b", models=("x",), params={"weight": {"y": (1.0,)}})
    with pytest.raises(ValueError):
        recipe_from({"kind": "source"})


def test_gene_groups_by_layer() -> None:
    assert num_values("model", 4) == 1 and num_values("layer_group", 5, 2) == 4
    values = (0.1, 0.2, 0.3, 0.9)
    assert value_for(values, "model.layers.3.mlp.up_proj.weight", 5, "layer_group", 2) == 0.2
    assert value_for(values, "model.embed_tokens.weight", 5, "layer_group", 2) == 0.9
    assert value_for((0.4,), "model.layers.3.mlp.up_proj.weight", 5, "layer_group", 2) == 0.4


def test_fixed_and_unsearched_parameters_ride_in_every_recipe() -> None:
    space = SearchSpace.build("ties", "base", ["add", "sub"], num_layers=4, fixed={"density": 0.3})
    assert space.names() == ["add.weight", "sub.weight"]  # scale is not searched by default
    recipe = space.decode([0.5, 1.0])
    assert recipe.params["density"] == {"add": (0.3,), "sub": (0.3,)} and recipe.shared == {"scale": (1.0,)}
    searched_scale = SearchSpace.build("ties", "base", ["add"], num_layers=4, ranges={"scale": (0.5, 1.5)})
    assert searched_scale.names() == ["add.density", "add.weight", "scale"]
    lines = SearchSpace.build("task_arithmetic", "base", ["add", "sub"], num_layers=4, transforms=["lines"],
                              fixed={"weight": 1.0})
    assert lines.names() == ["alpha", "beta"] and lines.decode([0.0, 1.0]).shared == {"alpha": (0.0,), "beta": (1.5,),
                                                                                    "scale": (1.0,)}
    module = SearchSpace.build("slerp", "base", ["add"], num_layers=4, layout="module")
    assert module.names() == ["t[0]", "t[1]", "t[2]"]
    depth = SearchSpace.build("task_arithmetic", "base", ["add"], num_layers=4, layout="depth", points=4)
    assert depth.dim == 4 and depth.decode([0.0, 0.25, 0.5, 1.0]).params["weight"]["add"] == (0.0, 0.25, 0.5, 1.0)


def test_schema_1_recipes_still_load() -> None:
    old = ('{"schema_version":1,"kind":"merge","method":"ties","base":"b","models":["x"],'
           '"params":{"weight":{"x":[1.0,0.5]}},"group_size":1,"normalize":false,"seed":0,"label":""}')
    recipe = parse_recipe(old)
    assert recipe.schema_version == 2 and recipe.layout == "layer_group" and recipe.group_size == 1


def _sphere(x: tuple[float, ...]) -> float:
    return float(np.sum((np.asarray(x) - 0.3) ** 2))


def test_async_cma_converges_and_replays_exactly() -> None:
    dim = 4
    es: AsyncCMA[int] = AsyncCMA([0.5] * dim, 1 / 6, default_popsize(dim), seed=0)
    history: list[list[tuple[tuple[float, ...], float]]] = []
    pending: list[tuple[int, tuple[float, ...]]] = []
    key = 0
    for _ in range(400):
        p = es.ask()
        pending.append((p.generation, p.x))
        if len(pending) > 2:  # results arrive out of order and late: keep two in flight
            gen, x = pending.pop(1)
            key += 1
            told = es.tell(gen, key, x, _sphere(x))
            if told is not None:
                history.append([])
    assert es.generation > 30
    assert _sphere(tuple(es.mean)) < 1e-4

    # Rebuild from the told generations only (what the database keeps).
    es2: AsyncCMA[int] = AsyncCMA([0.5] * dim, 1 / 6, default_popsize(dim), seed=0, stream=1)
    replay_es: AsyncCMA[int] = AsyncCMA([0.5] * dim, 1 / 6, default_popsize(dim), seed=0)
    told_log: list[list[tuple[tuple[float, ...], float]]] = []
    for _ in range(6):
        batch = [replay_es.ask() for _ in range(replay_es.popsize)]
        results = [(b.x, _sphere(b.x)) for b in batch]
        for i, (x, f) in enumerate(results):
            replay_es.tell(batch[i].generation, i, x, f)
        told_log.append(results)
    for results in told_log:
        es2.replay([x for x, _ in results], [f for _, f in results])
    np.testing.assert_allclose(es2.mean, replay_es.mean, rtol=1e-9, atol=0)
    assert es2.sigma == pytest.approx(replay_es.sigma, rel=1e-9) and es2.generation == replay_es.generation


def test_late_results_count_once_then_expire() -> None:
    es: AsyncCMA[int] = AsyncCMA([0.5, 0.5], 0.2, popsize=4, seed=1)
    first = [es.ask() for _ in range(6)]
    for i, p in enumerate(first[:4]):
        out = es.tell(p.generation, i, p.x, _sphere(p.x))
    assert out is not None and (out.index, out.keys) == (0, [0, 1, 2, 3]) and es.generation == 1
    # One generation late: still told, toward generation 1.
    assert es.tell(first[4].generation, 4, first[4].x, 0.0) is None
    second = [es.ask() for _ in range(3)]
    assert [p.generation for p in second] == [1, 1, 1]
    told = None
    for i, p in enumerate(second):
        told = es.tell(p.generation, 10 + i, p.x, _sphere(p.x))
    assert told is not None and (told.index, told.keys) == (1, [4, 10, 11, 12]) and es.generation == 2
    # Two generations late: ignored.
    assert es.tell(first[5].generation, 5, first[5].x, 0.0) is None
    assert es.generation == 2


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("popsize", [3, 4, 5, 8])
def test_small_populations_keep_pycma_consistent(popsize: int) -> None:
    """Small popsizes (pycma mirrors samples below 6) with results told out of order: no
    injected sample is orphaned (pycma warns when its bookkeeping no longer matches), and the
    search still moves toward the optimum."""
    es: AsyncCMA[int] = AsyncCMA([0.5, 0.5], 0.2, popsize=popsize, seed=4)
    pending = []
    for key in range(60 * popsize):
        p = es.ask()
        pending.append((p.generation, p.x))
        if len(pending) > 3:
            gen, x = pending.pop(key % 3)
            es.tell(gen, key, x, _sphere(x))
    assert es.generation > 20 and _sphere(tuple(es.mean)) < 1e-3


def test_failures_rank_last() -> None:
    es: AsyncCMA[int] = AsyncCMA([0.5, 0.5], 0.2, popsize=4, seed=2)
    ps = [es.ask() for _ in range(4)]
    for i, p in enumerate(ps):
        es.tell(p.generation, i, p.x, float("inf") if i < 2 else _sphere(p.x))
    assert np.all(np.isfinite(es.mean))


def test_leave_one_out_probes_zero_one_experts_weights() -> None:
    space = SearchSpace.build("dare_ties", "base", ["a", "b", "c"], 4, layout="layer_group", group_size=2,
                              ranges={"weight": (0.0, 2.0)})
    probes = space.leave_one_out([0.5] * space.dim)
    assert [name for name, _ in probes] == ["a", "b", "c"]
    for name, x in probes:
        recipe = space.decode(x)
        for expert in ("a", "b", "c"):
            weights = set(recipe.params["weight"][expert])
            assert weights == ({0.0} if expert == name else {1.0})
        assert set(recipe.params["density"][name]) == {0.5}  # only the weights move
    assert SearchSpace.build("slerp", "base", ["a"], 4).leave_one_out([0.5]) == []
