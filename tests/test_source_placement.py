"""Where a worker keeps its sources: on its device, or in host memory streamed per tensor."""

from __future__ import annotations

from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

from evomerge.workers.materialize import HEADROOM, Materializer, source_placement
from evomerge.workers.recipe import MergeRecipe, Recipe, SourceRecipe


@given(st.integers(0, 10**12), st.integers(1, 10**12))
def test_auto_keeps_sources_on_the_device_exactly_when_they_fit(source_bytes: int, free_bytes: int) -> None:
    fits = source_bytes <= HEADROOM * free_bytes
    assert source_placement("auto", source_bytes, free_bytes) == ("device" if fits else "host")
    assert source_placement("auto", source_bytes, None) == "device"  # the CPU: host memory either way
    assert source_placement("host", source_bytes, free_bytes) == "host"  # an explicit choice wins
    assert source_placement("device", source_bytes, free_bytes) == "device"


def test_host_sources_merge_exactly_as_device_sources(tiny_models: dict[str, Path]) -> None:
    """Streamed per tensor from host memory, a merge (and a source copy) equals the merge of
    sources held on the device; the host copies are the memory-mapped files' own tensors."""
    folders = {k: tiny_models[k] for k in ("base", "a", "b")}
    recipe = MergeRecipe(method="dare_ties", base="base", models=("a", "b"),
                    params={"weight": {"a": (0.7,), "b": (1.1,)}, "density": {"a": (0.5,), "b": (0.3,)}},
                    seed=3)
    on_device, on_host = Materializer(folders, "base", sources="device"), Materializer(folders, "base", sources="host")
    assert (on_device.placement, on_host.placement) == ("device", "host")
    assert all(t.device.type == "cpu" for t in on_host.sources["a"].values())
    for candidate in (recipe, SourceRecipe(source="b")):
        on_device.apply(candidate)
        on_host.apply(candidate)
        for key, param in on_device.params.items():
            assert torch.equal(param, on_host.params[key]), key
