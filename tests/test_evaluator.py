"""The lm-eval adapter: prompts rendered once, scores identical to a fresh evaluation."""

from __future__ import annotations

from evomerge.evaluators.harness import Evaluator
from evomerge.search.config import load_config
from tests.helpers import ROOT
from evomerge.workers.materialize import Materializer
from evomerge.workers.recipe import MergeRecipe, Recipe, SourceRecipe
from evomerge.workers.sources import validate_sources


def test_reused_requests_score_like_fresh_ones() -> None:
    cfg = load_config(ROOT / "demo" / "demo.yaml")
    suite = cfg.suite()
    mat = Materializer(validate_sources(cfg.sources()), cfg.base_model)
    evaluator = Evaluator(suite, mat.model, mat.tokenizer, batch_size=200)
    merge = MergeRecipe(method="task_arithmetic", base="base", models=("cipher_a", "cipher_b"),
                   params={"weight": {"cipher_a": (0.75,), "cipher_b": (0.75,)}})
    seen = []
    for recipe in (SourceRecipe(source="cipher_a"), merge, SourceRecipe(source="cipher_b")):
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


def test_scores_equal_plain_lm_eval_and_a_sample_equals_its_documents() -> None:
    """The adapter's caches (rendered requests, encodings, the documents as a list) change
    nothing: on a merged model every task scores what plain lm-eval (its HFLM, its task class)
    scores, on the whole split and on a sample of documents, called repeatedly."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.api.task import ConfigurableTask

    from evomerge.evaluators.settings import DocSample
    from evomerge.evaluators.tasks import task_config

    cfg = load_config(ROOT / "demo" / "demo.yaml")
    suite = cfg.suite()
    mat = Materializer(validate_sources(cfg.sources()), cfg.base_model)
    mat.apply(MergeRecipe(method="task_arithmetic", base="base", models=("cipher_a", "cipher_b"),
                     params={"weight": {"cipher_a": (0.8,), "cipher_b": (0.7,)}}))
    names = [t.name for t in suite.tasks]
    sample = {name: DocSample([3, 17, 40, 41, 150, 199]) for name in names}
    ours = Evaluator(suite, mat.model, mat.tokenizer, batch_size=200)
    plain_lm = HFLM(pretrained=mat.model, tokenizer=mat.tokenizer, batch_size=200)
    for samples in (None, sample, None, sample):
        got = ours._scores(False, samples or {}, suite.tasks)
        # lm-eval's own task class on the same YAML (its data paths made absolute)
        tasks = {t.name: ConfigurableTask(config=task_config(t, suite, suite.search_split)) for t in suite.tasks}
        plain = evaluate(lm=plain_lm, task_dict=tasks, samples=samples, bootstrap_iters=0, log_samples=False,
                         verbosity="WARNING")["results"]
        assert got == {name: plain[name]["acc,none"] for name in names}
