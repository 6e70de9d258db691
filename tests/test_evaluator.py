"""The lm-eval adapter: prompts rendered once, scores identical to a fresh evaluation."""

from __future__ import annotations

from evomerge.evaluators.harness import Evaluator
from evomerge.search.config import load_config
from tests.conftest import ROOT
from evomerge.workers.materialize import Materializer
from evomerge.workers.recipe import Recipe
from evomerge.workers.sources import validate_sources


def test_reused_requests_score_like_fresh_ones() -> None:
    cfg = load_config(ROOT / "demo" / "demo.yaml")
    suite = cfg.suite()
    mat = Materializer(validate_sources(cfg.sources()), cfg.base_model)
    evaluator = Evaluator(suite, mat.model, mat.tokenizer, batch_size=200)
    merge = Recipe(kind="merge", method="task_arithmetic", base="base", models=("cipher_a", "cipher_b"),
                   params={"weight": {"cipher_a": (0.75,), "cipher_b": (0.75,)}})
    seen = []
    for recipe in (Recipe(kind="source", source="cipher_a"), merge, Recipe(kind="source", source="cipher_b")):
        mat.apply(recipe)
        for heldout in (False, True):
            reused = evaluator.score(heldout=heldout)
            fresh = Evaluator(suite, mat.model, mat.tokenizer, batch_size=200).score(heldout=heldout)
            assert reused == fresh
            seen.append(reused)
    # The three models score differently, so no response leaked from one call to the next.
    assert seen[0]["cipher_a"] == 1.0 and seen[0]["cipher_b"] == 0.0
    assert seen[4]["cipher_b"] == 1.0 and seen[4]["cipher_a"] == 0.0
    assert 0.0 < seen[2]["cipher_mix"] < 1.0
