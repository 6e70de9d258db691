"""Gene layouts: which of a parameter's values governs which tensor (workers.layout)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.workers.layout import MODULES, depth_fraction, layer_index, module_kind, num_values, tensor_seed, value_for

L = 8  # decoder layers of the pretend Llama below
LAYER_NAMES = [f"model.layers.{i}.{m}" for i in range(L) for m in
               ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight",
                "input_layernorm.weight", "post_attention_layernorm.weight")]
OUTSIDE = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
FAST = settings(max_examples=40, deadline=None)


def ref_interp(values: list[float], x: float) -> float:
    """Piecewise-linear interpolation over anchors at 0, 1/(m−1), …, 1 (written by hand)."""
    m = len(values)
    pos = x * (m - 1)
    i = min(int(math.floor(pos)), m - 2)
    frac = pos - i
    return values[i] + frac * (values[i + 1] - values[i])


@pytest.mark.parametrize("name,kind", [
    ("model.layers.0.self_attn.q_proj.weight", "attention"),
    ("model.layers.11.self_attn.o_proj.weight", "attention"),
    ("model.layers.3.mlp.gate_proj.weight", "mlp"),
    ("model.layers.3.mlp.down_proj.weight", "mlp"),
    ("model.layers.3.input_layernorm.weight", "other"),
    ("model.layers.3.post_attention_layernorm.weight", "other"),
    ("model.embed_tokens.weight", "other"),
    ("model.norm.weight", "other"),
    ("lm_head.weight", "other"),
])
def test_module_kind_for_llama_names(name: str, kind: str) -> None:
    assert module_kind(name) == kind


def test_layer_index_and_depth_fraction() -> None:
    """Layer ℓ sits at ℓ/(L−1); tensors outside the layers at 0."""
    for i in range(L):
        assert layer_index(f"model.layers.{i}.mlp.up_proj.weight") == i
        assert depth_fraction(f"model.layers.{i}.mlp.up_proj.weight", L) == pytest.approx(i / (L - 1))
    for name in OUTSIDE:
        assert layer_index(name) is None and depth_fraction(name, L) == 0.0


@FAST
@given(st.floats(-5, 5), st.sampled_from(["model", "layer_group", "module", "depth"]),
       st.sampled_from(LAYER_NAMES + OUTSIDE))
def test_single_value_is_constant_under_every_layout(v: float, kind: str, name: str) -> None:
    assert value_for([v], name, L, kind, group_size=3) == v  # type: ignore[arg-type]


def test_model_layout_refuses_several_values() -> None:
    with pytest.raises(ValueError):
        value_for([0.1, 0.2], "model.layers.0.mlp.up_proj.weight", L, "model")


@pytest.mark.parametrize("group_size", [1, 3, 8])
def test_layer_group_layout(group_size: int) -> None:
    """Layer ℓ takes value ⌊ℓ/g⌋; tensors outside the layers the last value."""
    count = num_values("layer_group", L, group_size)
    assert count == math.ceil(L / group_size) + 1
    values = [0.1 * (i + 1) for i in range(count)]
    for name in LAYER_NAMES:
        layer = int(name.split(".")[2])
        assert value_for(values, name, L, "layer_group", group_size) == values[layer // group_size]
    for name in OUTSIDE:
        assert value_for(values, name, L, "layer_group", group_size) == values[-1]


def test_module_layout() -> None:
    """One value per module type, in the order of MODULES."""
    values = [0.2, 0.5, 0.9]
    assert num_values("module", L) == len(MODULES) == 3
    for name in LAYER_NAMES + OUTSIDE:
        assert value_for(values, name, L, "module") == values[MODULES.index(module_kind(name))]


@FAST
@given(st.lists(st.floats(-2, 2), min_size=2, max_size=7), st.integers(2, 40), st.data())
def test_depth_layout_interpolates_between_anchors(values: list[float], layers: int, data: st.DataObject) -> None:
    """Anchors evenly spread over [0, 1], linear in between, at depth ℓ/(L−1)."""
    layer = data.draw(st.integers(0, layers - 1))
    name = f"model.layers.{layer}.self_attn.k_proj.weight"
    got = value_for(values, name, layers, "depth")
    assert got == pytest.approx(ref_interp(values, layer / (layers - 1)), abs=1e-9)
    assert num_values("depth", layers, points=len(values)) == len(values)


@pytest.mark.parametrize("name", OUTSIDE)
def test_depth_layout_outside_layers_takes_first_anchor(name: str) -> None:
    assert value_for([0.3, 0.7, 1.1], name, L, "depth") == 0.3


def test_depth_layout_hits_anchors_on_the_grid() -> None:
    """With L − 1 divisible by m − 1 the anchors fall on layers: first layer = first, last = last."""
    values = [1.0, 0.0, 2.0]
    assert value_for(values, "model.layers.0.mlp.up_proj.weight", 9, "depth") == 1.0
    assert value_for(values, "model.layers.4.mlp.up_proj.weight", 9, "depth") == 0.0
    assert value_for(values, "model.layers.8.mlp.up_proj.weight", 9, "depth") == 2.0
    assert value_for(values, "model.layers.2.mlp.up_proj.weight", 9, "depth") == pytest.approx(0.5)


def test_tensor_seed_is_stable() -> None:
    """Pinned values (crc32, not Python's salted hash), so random masks replay across processes;
    distinct for distinct names and recipe seeds, and within [0, 2**63)."""
    assert tensor_seed(0, "lm_head.weight") == 2605591890
    assert tensor_seed(7, "model.layers.3.mlp.up_proj.weight") == 1664196911
    seeds = {tensor_seed(s, n) for s in (0, 1, 2) for n in LAYER_NAMES[:12] + OUTSIDE}
    assert len(seeds) == 3 * 15
    assert all(0 <= s < 2**63 for s in seeds)
