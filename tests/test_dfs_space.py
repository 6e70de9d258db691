"""DFS genomes -> routes: properties of path decoding (hypothesis) and the rejection rules."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.search.dfs_space import RouteLimits, RouteSpace
from evomerge.workers.recipe import Recipe, parse_recipe


def _space(pin: bool = True, block: int = 1, repeats: int = 2, max_hops: int = 64,
           memory: float | None = None) -> RouteSpace:
    return RouteSpace(("a", "b"), (4, 3), repeats, block, pin, (0.0, 2.0),
                      RouteLimits(max_hops, memory, bytes_per_hop=1000.0))


def _layout(space: RouteSpace) -> list[tuple[str, int]]:
    return [(s.model, layer) for s in space.slots for layer in s.layers]


def _is_subsequence(path: list[tuple[str, int]], layout: list[tuple[str, int]]) -> bool:
    it = iter(layout)
    return all(any(hop == slot for slot in it) for hop in path)


@settings(max_examples=150, deadline=None)
@given(st.data(), st.booleans(), st.sampled_from([1, 2, 3]), st.integers(1, 3))
def test_paths_follow_the_layout_and_pin_ends(data: st.DataObject, pin: bool, block: int, repeats: int) -> None:
    space = _space(pin, block, repeats)
    genes = data.draw(st.lists(st.floats(-0.5, 1.5), min_size=space.dim, max_size=space.dim))
    recipe = space.decode(genes)
    path = list(recipe.route)
    inner = path[1:-1] if pin else path
    assert _is_subsequence(inner, _layout(space))  # order within (and across) repetitions kept
    if pin:
        assert path[0] == ("a", 0) and path[-1] == ("a", 3)
        assert recipe.scales[0] == 1.0 and recipe.scales[-1] == 1.0
    on = sum(1 for g in genes[: len(space.slots)] if g > 0.5)
    assert len(path) <= on * block + (2 if pin else 0)
    low, high = space.bounds()["hops"]  # Optuna must accept every path's length, rejected ones too
    assert low <= space.params_of(recipe)["hops"] <= high
    assert all(0.0 <= s <= 2.0 for s in recipe.scales)
    assert parse_recipe(recipe.to_json()) == recipe


def test_pinned_layers_leave_the_layout_and_the_start_is_model_a() -> None:
    space = _space(pin=True)
    assert [s.layers for s in space.slots if s.model == "a"] == [(1,), (2,), (1,), (2,)]
    assert space.decode(space.x0()).route == space.identity().route == tuple(("a", i) for i in range(4))
    assert space.decode(space.x0()).scales == (1.0,) * 4
    unpinned = _space(pin=False, block=2)
    assert [s.layers for s in unpinned.slots][:4] == [(0, 1), (2, 3), (0, 1), (2,)]
    assert unpinned.decode(unpinned.x0()).route == tuple(("a", i) for i in range(4))
    assert len(space.names()) == space.dim and space.names()[0] == "r0.A1.on"


def test_rejections_are_reasons_not_crashes() -> None:
    space = _space(pin=False, max_hops=5, memory=6000.0)
    off = space.decode([0.0] * space.dim)
    assert off.route == () and space.reject(off) == "empty path: no slot is on"
    every = space.decode([1.0] * space.dim)
    assert "exceeds dfs.max_hops 5" in (space.reject(every) or "")
    assert len(every.route) == space.longest and space.bounds()["hops"] == (0.0, float(space.longest))
    roomy = _space(pin=False, max_hops=50, memory=6000.0)
    assert "GiB of activations" in (roomy.reject(roomy.decode([1.0] * roomy.dim)) or "")
    assert roomy.reject(roomy.decode(roomy.x0())) is None


def test_scale_genes_map_to_the_range() -> None:
    space = _space(pin=False)
    x = np.asarray(space.x0())
    x[len(space.slots)] = 0.25  # the scale gene of A's first slot
    assert space.decode(x).scales[0] == 0.5
