"""Every model-touching path on tiny Llama-, Qwen2- (layer_types with a sliding layer, q/k/v
biases, tied embeddings) and Mistral-style (sliding window) models: a PS+DFS search with real
Ray, lm-eval and SQLite, its DFS leaderboard, the replay of its best route, and a merge.

Routing itself (routes of changing length on one worker, cached decoding, export) is covered
per architecture in tests/test_routing.py."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers import ARCHITECTURES, write_config
from tests.test_search_e2e import evomerge, query
from evomerge.workers.recipe import MergeRecipe, Recipe, parse_recipe

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray

TASKS = ("mc_add", "mc_sub")


@pytest.fixture(scope="module")
def choice_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two multiple-choice lm-eval tasks (16 sums or differences, 4 answers each): random tiny
    models score near chance but not alike, so a model's fitness tells it from the others."""
    root = tmp_path_factory.mktemp("choice_tasks")
    rng = random.Random(0)
    for name, op in zip(TASKS, "+-"):
        data = root / f"{name}.jsonl"
        with open(data, "w") as f:
            for _ in range(16):
                a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
                r = a + b if op == "+" else a - b
                f.write(json.dumps({"question": f"{a}{op}{b}=", "choices": [str(r), str(r + 1), str(r + 10),
                                                                            str(abs(r - 1))]}) + "\n")
        (root / f"{name}.yaml").write_text(  # absolute data path: lm-eval resolves it against the cwd
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    search: {data}\n"
            "test_split: search\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: 0\ntarget_delimiter: \"\"\nmetric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return root


@dataclass(frozen=True)
class Searched:
    arch: str
    tmp: Path
    db: Path
    models: dict[str, Path]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def searched(request: pytest.FixtureRequest, arch_models: dict[str, dict[str, Path]], choice_tasks: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Searched:
    """A short PS+DFS search: PS = its 5 baselines + 1 proposal; DFS over (ps, a, b) with two
    repetitions = its 4 baselines + 4 proposals (sigma0 0.5, so that proposals switch slots
    on: from sigma 1/6 most would repeat model A). The architectures run one after another:
    three Ray clusters starting at once on a loaded machine made a raylet time out."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"psdfs_{arch}")
    cfg = write_config(tmp / "c.yaml", arch_models[arch], choice_tasks, space="ps+dfs",
                       evaluation={"task_paths": [str(choice_tasks)], "tasks": [{"name": t} for t in TASKS],
                                   "search_split": "search"},
                       optimizer={"popsize": 4, "sigma0": 0.5}, budget={"max_trials": 6},
                       dfs={"repeats": 2, "max_trials": 8}, workers={"count": 1})
    evomerge("search", str(cfg), "--storage", f"sqlite:///{tmp / 'r.db'}", "--workers", "1", cwd=tmp)
    return Searched(arch, tmp, tmp / "r.db", arch_models[arch])


def _rows(db: Path, study: str) -> list[tuple[str, str, str, float | None, str | None]]:
    """(origin, state, recipe_json, fitness, error) of a study's candidates, by id."""
    return query(db, "select c.origin, c.state, c.recipe_json, c.fitness, c.error from evomerge_candidates c "
                     f"join evomerge_studies s on s.id = c.study_id where s.name = '{study}' order by c.id")


def test_dfs_stage_evaluates_its_sources_and_routes(searched: Searched) -> None:
    """Nothing fails in the DFS stage: the source baselines are scored as the models they are
    (the same fitness as in the PS stage; the PS model as the PS stage's best), and routes over
    several models run on every architecture."""
    ps, dfs = _rows(searched.db, "t"), _rows(searched.db, "t:dfs")
    assert len(dfs) == 8 and [(o, s, e) for o, s, _, _, e in dfs if s != "complete"] == []
    ps_fitness = {json.loads(r)["label"]: f for o, _, r, f, _ in ps if o == "source"}
    dfs_fitness = {json.loads(r)["label"]: f for o, _, r, f, _ in dfs if o == "source"}
    assert dfs_fitness.keys() == {"PS model ps", "source a", "source b"}
    assert dfs_fitness["source a"] == ps_fitness["source a"] and dfs_fitness["source b"] == ps_fitness["source b"]
    assert dfs_fitness["PS model ps"] == max(f for *_, f, _ in ps if f is not None)
    routes = [json.loads(r)["route"] for o, _, r, _, _ in dfs if o == "cma"]
    assert any({name for name, _ in route} != {"ps"} for route in routes), routes


def test_dfs_leaderboard_shows_every_source(searched: Searched) -> None:
    """The DFS study's own board (``evomerge status --study t:dfs``) ranks models a and b."""
    from evomerge.search.app.leaderboard import build
    from evomerge.storage.repository import Repository

    repo = Repository(f"sqlite:///{searched.db}")
    study = repo.get_study("t:dfs")
    assert study is not None
    board = build(study.name, repo.candidates(study.id), 10)
    shown = {r.summary for r in board.baselines if r.origin == "source"}
    assert {"source a", "source b"} <= shown and board.failed == 0, shown


def test_replay_of_the_best_mixed_route(searched: Searched, tmp_path: Path) -> None:
    """The best route that mixes models replays as an ordinary model of the architecture with
    one layer (and, where the config has them, one layer type) per hop; write_model_folder
    checks its logits against the worker's in-memory route."""
    from evomerge.workers.materialize import Materializer
    from evomerge.workers.replay import write_model_folder

    routes = [parse_recipe(r) for o, s, r, _, _ in sorted(_rows(searched.db, "t:dfs"), key=lambda x: -(x[3] or 0))
              if o == "cma" and s == "complete"]
    recipe = next(r for r in routes if {name for name, _ in r.route} != {"ps"})
    folder = write_model_folder(Materializer(searched.models, "base"), recipe, tmp_path / "route", "card")
    model = AutoModelForCausalLM.from_pretrained(folder)
    source = AutoModelForCausalLM.from_pretrained(searched.models["a"]).config
    assert model.config.model_type == source.model_type == searched.arch
    assert model.config.num_hidden_layers == len(recipe.route)
    if getattr(source, "layer_types", None) is not None:
        assert model.config.layer_types == [source.layer_types[i] for _, i in recipe.route]
    assert getattr(model.config, "sliding_window", None) == getattr(source, "sliding_window", None)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merge_of_each_architecture(arch: str, arch_models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    """Task arithmetic written to disk: every tensor (q/k/v biases included) is θ_b + Σ w_i δ_i,
    the config is the base's (tied embeddings stay tied)."""
    from evomerge.workers.materialize import Materializer
    from evomerge.workers.replay import write_model_folder
    from evomerge.workers.sources import SourceModel, validate_sources

    folders = validate_sources([SourceModel(n, str(p)) for n, p in arch_models[arch].items()])
    weights = {"a": 0.6, "b": 0.7}
    recipe = MergeRecipe(method="task_arithmetic", base="base", models=("a", "b"),
                    params={"weight": {m: (w,) for m, w in weights.items()}}, shared={"scale": (1.0,)})
    folder = write_model_folder(Materializer(folders, "base"), recipe, tmp_path / "merged", "card")
    written = load_file(folder / "model.safetensors")
    base = load_file(folders["base"] / "model.safetensors")
    experts = {m: load_file(folders[m] / "model.safetensors") for m in weights}
    assert written.keys() == base.keys()
    assert arch != "qwen2" or any(k.endswith("q_proj.bias") for k in written)
    for key, value in written.items():
        expected = base[key] + sum(w * (experts[m][key] - base[key]) for m, w in weights.items())
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5, msg=key)
    config, base_config = (json.loads((f / "config.json").read_text()) | {"transformers_version": None}
                           for f in (folder, folders["base"]))
    assert config == base_config
    merged = AutoModelForCausalLM.from_pretrained(folder)
    if merged.config.tie_word_embeddings:
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
