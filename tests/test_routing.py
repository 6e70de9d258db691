"""Layer routing (DFS) on real tiny Llama-, Qwen2- (layer_types, sliding layer, q/k/v biases,
tied embeddings) and Mistral-style (sliding window) models: identity, shared weights, per-hop
KV-cache slots, routes of changing length on one worker, and the export as an ordinary model
whose logits equal the in-memory route's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.helpers import ARCHITECTURES
from evomerge.workers.recipe import MergeRecipe, Recipe, RouteRecipe, SourceRecipe
from evomerge.workers.route_spec import Route, RouteError, check_routable
from evomerge.workers.routing import Router, export_config, export_state_dict

torch.set_num_threads(1)


def _load(folder: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def sources(request: pytest.FixtureRequest, arch_models: dict[str, dict[str, Path]]) -> dict[str, PreTrainedModel]:
    folders = arch_models[request.param]
    return {"A": _load(folders["a"]), "B": _load(folders["b"])}


def _ids(seed: int = 0, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 16, (batch, length), generator=torch.Generator().manual_seed(seed))


# A path that uses A's layer 1 twice and mixes in B, with scales that are not 1.
MIXED = Route("A", (("A", 0), ("B", 1), ("A", 1), ("A", 1), ("B", 0)), (0.9, 1.2, 0.7, 1.0, 1.3))


@torch.no_grad()
def test_identity_path_reproduces_model_a(sources: dict[str, PreTrainedModel]) -> None:
    router = Router.over_models(sources, "A")
    router.apply(Route("A", (("A", 0), ("A", 1)), (1.0, 1.0)))
    ids = _ids()
    assert torch.equal(router.model(ids).logits, sources["A"](ids).logits)


@torch.no_grad()
def test_routing_shares_weights_and_leaves_sources_untouched(sources: dict[str, PreTrainedModel]) -> None:
    ids = _ids(1)
    before = sources["A"](ids).logits.clone()
    router = Router.over_models(sources, "A")
    router.apply(MIXED)
    layers = router.model.model.layers
    assert layers[3].mlp.inner is sources["A"].model.layers[1].mlp  # shared, wrapped for the next scale
    assert layers[2].self_attn.q_proj.weight.data_ptr() == sources["A"].model.layers[1].self_attn.q_proj.weight.data_ptr()
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3, 4]
    assert [layer.self_attn.layer_idx for layer in sources["A"].model.layers] == [0, 1]
    assert sources["A"].config.num_hidden_layers == 2 and router.model.config.num_hidden_layers == 5
    router.model(ids)
    assert torch.equal(sources["A"](ids).logits, before)
    recipe = RouteRecipe(base="A", models=("A", "B"), route=MIXED.hops, scales=MIXED.scales)
    assert recipe.path_text() == "A0×0.90 B1×1.20 A1×0.70 A1 B0×1.30"
    assert recipe.summary() == "route of 5 hops: A0×0.90 B1×1.20 A1×0.70 A1 B0×1.30 (A=A, B=B)"


@torch.no_grad()
def test_cached_generation_equals_full_forward(sources: dict[str, PreTrainedModel]) -> None:
    """Each hop has its own KV-cache slot: decoding token by token with the cache gives the
    logits of a full forward pass, though A's layer 1 runs at two hops."""
    router = Router.over_models(sources, "A")
    router.apply(MIXED)
    model, ids = router.model, _ids(2, batch=1, length=8)
    _assert_cached_decoding_matches(model, ids, prompt=4)
    greedy = model.generate(ids[:, :3], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    recompute = model.generate(ids[:, :3], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(greedy, recompute)


# A path as a pinned DFS search makes it: A's first layer at scale 1 starts it.
PINNED = Route("A", (("A", 0), ("B", 1), ("B", 0), ("A", 1)), (1.0, 0.8, 1.2, 1.0))


@torch.no_grad()
@pytest.mark.parametrize("route", [MIXED, PINNED], ids=["scaled_embedding", "pinned"])
def test_export_is_an_ordinary_model_with_the_same_logits(route: Route, sources: dict[str, PreTrainedModel],
                                                          tmp_path: Path) -> None:
    """Tensors as a worker holds them (tied weights once, no lm_head.weight) export to a model
    that loads strictly, stays tied when the embedding is not scaled, and has the route's logits."""
    router = Router.over_models(sources, "A")
    router.apply(route)
    tensors = {n: dict(m.named_parameters()) for n, m in sources.items()}
    config = export_config(route, {n: m.config for n, m in sources.items()})
    tied = bool(sources["A"].config.tie_word_embeddings)
    state = export_state_dict(route, tensors, tied=tied)
    exported = AutoModelForCausalLM.from_config(config).eval()
    exported.load_state_dict(state, strict=True)
    exported.save_pretrained(tmp_path / "route")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "route", trust_remote_code=False).eval()
    assert reloaded.config.num_hidden_layers == len(route.hops)
    assert reloaded.config.tie_word_embeddings == (tied and route.scales[0] == 1.0)
    ids = _ids(3)
    expected = router.model(ids).logits
    assert float((reloaded(ids).logits - expected).abs().max()) <= 1e-4


def test_incompatible_models_and_bad_routes_are_refused(tiny_models: dict[str, Path],
                                                        arch_models: dict[str, dict[str, Path]]) -> None:
    sources = {"A": _load(tiny_models["a"]), "B": _load(tiny_models["b"])}
    wide = _load(tiny_models["wide"])
    with pytest.raises(RouteError, match="config hidden_size differs"):
        check_routable({"A": sources["A"].config, "W": wide.config}, "A")
    mistral = _load(arch_models["mistral"]["a"]).config
    with pytest.raises(RouteError, match="config sliding_window differs"):
        check_routable({"A": mistral, "W": mistral.__class__(**{**mistral.to_dict(), "sliding_window": 8})}, "A")
    with pytest.raises(RouteError, match="empty path"):
        Route("A", (), ())
    router = Router.over_models(sources, "A")
    with pytest.raises(RouteError, match="no layer 7 in model 'B'"):
        router.apply(Route("A", (("A", 0), ("B", 7)), (1.0, 1.0)))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_replay_of_route_and_ps_route_recipes(arch: str, arch_models: dict[str, dict[str, Path]],
                                              tmp_path: Path) -> None:
    """A route recipe over a source and a merged member replays as an ordinary model whose
    logits equal the worker's in-memory route (write_model_folder verifies it to 1e-4)."""
    from evomerge.workers.candidate_model import CandidateModel
    from evomerge.workers.materialize import Materializer
    from evomerge.workers.replay import write_model_folder

    mat = Materializer(arch_models[arch], "base")
    ps = MergeRecipe(method="task_arithmetic", base="base", models=("a", "b"),
                params={"weight": {"a": (0.6,), "b": (0.7,)}}, shared={"scale": (1.0,)})
    route = RouteRecipe(base="ps", models=("ps", "a"), members={"ps": ps},
                   route=(("ps", 1), ("a", 0), ("ps", 0), ("ps", 1)), scales=(1.1, 0.8, 1.0, 1.2))
    folder = write_model_folder(mat, route, tmp_path / "route", "card")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert reloaded.config.num_hidden_layers == 4
    candidate = CandidateModel(mat)
    candidate.apply(route)
    ids = _ids(5)
    with torch.no_grad():
        assert float((reloaded(ids).logits - candidate.model(ids).logits).abs().max()) <= 1e-4
        # The identity route of the merged head is the PS model itself.
        candidate.apply(route.model_copy(update={"route": (("ps", 0), ("ps", 1)), "scales": (1.0, 1.0)}))
        routed = candidate.model(ids).logits.clone()
        candidate.apply(ps)
        assert torch.equal(routed, candidate.model(ids).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_replays_in_16_bit_workers_dtype(dtype: torch.dtype, tiny_models: dict[str, Path],
                                               tmp_path: Path) -> None:
    """bf16/fp16 workers: the folder holds the hop scales folded into 16-bit weights (one
    rounding each) and passes the logits check, which still refuses a route whose scales
    differ from what was exported."""
    from safetensors.torch import load_file

    from evomerge.workers.candidate_model import CandidateModel
    from evomerge.workers.materialize import Materializer
    from evomerge.workers.replay import ReplayError, verify_route, write_model_folder

    mat = Materializer({k: tiny_models[k] for k in ("base", "a", "b")}, "base", dtype)
    route = RouteRecipe(base="a", models=("a", "b"), route=(("a", 0), ("b", 1), ("a", 1), ("a", 1)),
                   scales=(1.0, 0.6, 1.0, 1.3))
    folder = write_model_folder(mat, route, tmp_path / "route", "card")
    written = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    source_b = load_file(tiny_models["b"] / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"  # hop 1 = b's layer 1, output scaled by hop 2's 1.0
    assert written.get_parameter(key).dtype == dtype and torch.equal(written.get_parameter(key), source_b[key].to(dtype))
    folded = "model.layers.0.mlp.down_proj.weight"  # hop 0 = a's layer 0, output × hop 1's 0.6
    source_a = load_file(tiny_models["a"] / "model.safetensors")
    assert torch.equal(written.get_parameter(folded), source_a[folded].to(dtype) * 0.6)

    candidate = CandidateModel(mat)
    candidate.apply(route.model_copy(update={"scales": (1.0, 0.3, 1.0, 1.3)}))  # not what was written
    with pytest.raises(ReplayError, match="logits differ"):
        verify_route(candidate.model, written, folder)
    candidate.release()


# Routes of changing length, as a worker meets them: long, one hop, short, longer again.
SEQUENCE = (
    (("a", 0), ("b", 1), ("a", 1), ("a", 1), ("b", 0)),
    (("a", 1),),
    (("b", 1), ("a", 0)),
    (("a", 0), ("a", 1), ("b", 1), ("b", 0), ("a", 1), ("a", 1)),
)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_routes_of_changing_length_on_one_worker(arch: str, arch_models: dict[str, dict[str, Path]]) -> None:
    """One CandidateModel runs routes of different lengths one after another: each gives the
    logits a fresh worker gives for it alone, with one layer type per hop from its source
    layer, and the model's own config (shared with the collection) is never rewritten."""
    from evomerge.workers.candidate_model import CandidateModel
    from evomerge.workers.materialize import Materializer

    candidate = CandidateModel(Materializer(arch_models[arch], "base"))
    own = candidate.model.config
    before = own.to_dict()
    types = getattr(own, "layer_types", None)
    ids = _ids(6, batch=2, length=10)  # longer than the sliding windows (4) of qwen2 and mistral
    with torch.no_grad():
        for k, hops in enumerate(SEQUENCE):
            recipe = RouteRecipe(base="a", models=("a", "b"), route=hops,
                            scales=tuple(1.0 + 0.1 * ((k + i) % 3) for i in range(len(hops))))
            candidate.apply(recipe)
            got = candidate.model(ids).logits
            fresh = CandidateModel(Materializer(arch_models[arch], "base"))
            fresh.apply(recipe)
            assert torch.equal(got, fresh.model(ids).logits), f"route {k} ({len(hops)} hops)"
            assert candidate.model.config.num_hidden_layers == len(hops)
            if types is not None:
                assert candidate.model.config.layer_types == [types[i] for _, i in hops]
            assert own.to_dict() == before and candidate.config is own
        _assert_cached_decoding_matches(candidate.model, _ids(7, batch=1, length=9), prompt=3)
        candidate.apply(SourceRecipe(source="a"))
        assert candidate.model.config is own and len(candidate.model.model.layers) == 2
        assert torch.equal(candidate.model(ids).logits, _load(arch_models[arch]["a"])(ids).logits)


def _assert_cached_decoding_matches(model: PreTrainedModel, ids: torch.Tensor, prompt: int) -> None:
    """Token-by-token decoding with the KV cache after ``prompt`` tokens gives the logits of one
    full forward pass."""
    full = model(ids).logits
    out = model(ids[:, :prompt], use_cache=True)
    cache, steps = out.cache, [out.logits]
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
