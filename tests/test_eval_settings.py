"""Evaluation settings instruct models need (docs/evaluation.md): few-shot examples, the chat
template with a system instruction, multi-turn few-shot, generation overrides, and the seeded
document samples of the search and held-out splits. Rendered on a real tiny Llama with the
BPE tokenizer and ChatML template of tests/conftest.py; wrong settings through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, save_tiny_arch, write_config
from tests.test_bad_input import run_cli
from tests.test_search_e2e import evomerge, query
from evomerge.evaluators.harness import Evaluator
from evomerge.evaluators.settings import sample_docs
from evomerge.evaluators.spec import TaskSpec, TaskSuite
from evomerge.search.app.cli import main
from evomerge.search.config import load_config

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray

SYSTEM = "You are a careful calculator."
DOCS = 12  # per split


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_arch(tmp_path_factory.mktemp("chat") / "llama", "llama")


def _question(split: str, i: int) -> str:
    return f"{split[0]}{i:02d}+{i}="  # the split's initial tells the documents apart


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gen_add (generate_until) and ll_add (loglikelihood), few-shot examples from a train
    split; no_shots has no split to draw them from but the scored one."""
    root = tmp_path_factory.mktemp("settings_tasks")
    for split in ("train", "search", "heldout"):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(DOCS):
                f.write(json.dumps({"question": _question(split, i), "answer": str(i + i)}) + "\n")
    files = "".join(f"    {s}: {s}.jsonl\n" for s in ("train", "search", "heldout"))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n{files}test_split: search\n"
              "doc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\n")
    (root / "gen_add.yaml").write_text(
        f"task: gen_add\n{common}fewshot_split: train\noutput_type: generate_until\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 3\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    for name, extra in (("ll_add", "fewshot_split: train\n"), ("no_shots", "")):
        (root / f"{name}.yaml").write_text(
            f"task: {name}\n{common}{extra}output_type: loglikelihood\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return root


def _prompts(model_dir: Path, task_dir: Path, heldout: bool = False, **settings: object) -> list[str]:
    """The contexts lm-eval built for gen_add when the tiny model was scored with ``settings``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    limits = {k: settings.pop(k) for k in ("limit", "heldout_limit", "sample_seed") if k in settings}
    suite = TaskSuite((TaskSpec("gen_add", "exact_match", **settings),), (task_dir,), "search", "heldout", **limits)
    evaluator = Evaluator(suite, AutoModelForCausalLM.from_pretrained(model_dir),
                          AutoTokenizer.from_pretrained(model_dir), batch_size=16)
    evaluator.score(heldout=heldout)
    return evaluator.prompts(heldout)["gen_add"]


def test_chat_template_system_instruction_and_multiturn_shots_are_rendered(chat_model: Path, task_dir: Path) -> None:
    plain = _prompts(chat_model, task_dir, limit=2)
    assert plain[0] == _question("search", int(plain[0][1:3]))  # the bare question: no template, no shots
    chat = _prompts(chat_model, task_dir, limit=2, num_fewshot=2, apply_chat_template=True,
                    system_instruction=SYSTEM, fewshot_as_multiturn=True)
    first = chat[0]
    assert first.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"), first
    assert first.endswith("<|im_end|>\n<|im_start|>assistant\n"), first
    assert first.count("<|im_start|>user") == 3 and first.count("<|im_start|>assistant") == 3, first
    shots = [line.removesuffix("<|im_end|>") for line in first.splitlines() if line.startswith("t")]  # train split
    assert len(shots) == 2, first
    for shot in shots:  # each shot is answered in its own assistant turn
        i = int(shot[1:3])
        assert f"{shot}<|im_end|>\n<|im_start|>assistant\n{i + i}<|im_end|>" in first, first


def test_single_turn_shots_and_shots_without_template(chat_model: Path, task_dir: Path) -> None:
    """Without multi-turn the shots and the question share one user turn; without the chat
    template the shots come as plain text before the question, answers included."""
    single = _prompts(chat_model, task_dir, limit=1, num_fewshot=2, apply_chat_template=True)[0]
    assert single.count("<|im_start|>user") == 1 and "<|im_start|>system" not in single, single
    assert sum(1 for line in single.splitlines() if line.startswith(("t", "<|im_start|>user\nt"))) >= 2, single
    text = _prompts(chat_model, task_dir, limit=1, num_fewshot=2, system_instruction=SYSTEM)[0]
    # lm-eval prepends the instruction as is: no separator before the first shot
    assert "<|im_start|>" not in text and text.startswith(SYSTEM + "t"), text
    blocks = text.removeprefix(SYSTEM).split("\n\n")
    assert len(blocks) == 3 and all(b.startswith("t") for b in blocks[:2]), text  # 2 answered shots, the question
    assert all(b.endswith(str(2 * int(b[1:3]))) for b in blocks[:2]) and blocks[2].startswith("s"), text


def _sampled_questions(split: str, chosen: list[int]) -> list[str]:
    return [_question(split, i) for i in chosen]


def test_limit_is_a_seeded_sample_fixed_by_the_stored_seed(chat_model: Path, task_dir: Path) -> None:
    chosen = sample_docs(DOCS, 4, 7, "gen_add", "search")
    assert chosen is not None and len(chosen) == 4 and list(chosen) != [0, 1, 2, 3]
    assert list(chosen) == list(sample_docs(DOCS, 4, 7, "gen_add", "search"))
    assert list(chosen) != list(sample_docs(DOCS, 4, 8, "gen_add", "search"))
    assert sample_docs(DOCS, DOCS, 7, "gen_add", "search") is None  # a limit that does not cut
    # another process (another hash seed) draws the same documents
    code = ("from evomerge.evaluators.settings import sample_docs; "
            f"print(list(sample_docs({DOCS}, 4, 7, 'gen_add', 'search')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert json.loads(out) == list(chosen)
    # and the evaluator scores exactly those documents, in every call
    prompts = _prompts(chat_model, task_dir, limit=4, sample_seed=7)
    assert prompts == _sampled_questions("search", list(chosen))


def test_heldout_limit_is_separate(chat_model: Path, task_dir: Path) -> None:
    assert len(_prompts(chat_model, task_dir, heldout=True, limit=3)) == DOCS  # default: every document
    prompts = _prompts(chat_model, task_dir, heldout=True, limit=3, heldout_limit=5, sample_seed=1)
    chosen = sample_docs(DOCS, 5, 1, "gen_add", "heldout")
    assert chosen is not None and prompts == _sampled_questions("heldout", list(chosen))


def _cfg(tmp_path: Path, models: dict[str, Path], task_dir: Path, tasks: list[dict[str, object]],
         **evaluation: object) -> Path:
    ev = {"task_paths": [str(task_dir)], "tasks": tasks, "search_split": "search", "heldout_split": "heldout",
          "heldout_top_k": 1, **evaluation}
    return write_config(tmp_path / "c.yaml", models, task_dir, evaluation=ev, optimizer={"popsize": 3},
                        budget={"max_trials": 4}, workers={"count": 1})


GEN = {"name": "gen_add", "metric": "exact_match"}


@pytest.mark.parametrize("tasks, evaluation, message", [
    ([GEN | {"fewshot_as_multiturn": True}], {"num_fewshot": 1},
     "evaluation: tasks[0] 'gen_add': fewshot_as_multiturn needs apply_chat_template: true"),
    ([GEN | {"generation_kwargs": {"top_p": 0.9}}], {}, "evaluation.tasks.0.generation_kwargs.top_p: unknown field"),
    ([GEN | {"generation_kwargs": {"temperature": 0.7}}], {}, "sampling makes a candidate's score random"),
    ([{"name": "ll_add", "generation_kwargs": {"max_gen_toks": 4}}], {},
     "task 'll_add': generation_kwargs apply to generate_until tasks; it is a loglikelihood task"),
    ([GEN], {"apply_chat_template": True, "fewshot_as_multiturn": True},
     "task 'gen_add': fewshot_as_multiturn needs few-shot examples (its num_fewshot is 0)"),
    ([{"name": "no_shots", "num_fewshot": 2}], {},
     "task 'no_shots': num_fewshot 2 would draw examples from the scored split 'search' itself"),
    ([GEN | {"num_fewshot": DOCS + 1}], {}, f"task 'gen_add': num_fewshot {DOCS + 1} but its few-shot split 'train'"),
    ([GEN], {"heldout_limit": 0}, "evaluation.heldout_limit: Input should be greater than or equal to 1"),
    ([GEN], {"apply_chat_template": "yes"}, "evaluation.apply_chat_template: Input should be a valid boolean"),
    ([GEN, GEN | {"num_fewshot": 1}], {}, "evaluation: tasks[1] 'gen_add': listed twice with different settings"),
])
def test_a_wrong_setting_is_one_line_before_any_work(tmp_path: Path, chat_model: Path, task_dir: Path,
                                                     tasks: list[dict[str, object]], evaluation: dict[str, object],
                                                     message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's entry point in this process (a subprocess per case cost 20 s here; the
    process path is the next test's)."""
    cfg = _cfg(tmp_path, {"base": chat_model, "a": chat_model}, task_dir, tasks, **evaluation)
    status = main(["search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "x.db").exists()


def test_chat_template_needs_a_tokenizer_that_has_one(tmp_path: Path, tiny_models: dict[str, Path],
                                                      task_dir: Path) -> None:
    """``python -m evomerge search``: exit 2, one line, before the database or Ray."""
    cfg = _cfg(tmp_path, {k: tiny_models[k] for k in ("base", "a")}, task_dir, [GEN], apply_chat_template=True)
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "evomerge: error: task 'gen_add': apply_chat_template, but the tokenizer of model 'base' has no chat "
        "template"], proc.stderr
    assert not (tmp_path / "x.db").exists()


def test_settings_are_part_of_the_study(tmp_path: Path, chat_model: Path, task_dir: Path) -> None:
    """Every setting that changes what a score means changes the study's identity (a resume
    with it changed is refused); a config that leaves them out means the defaults."""
    models = {"base": chat_model, "a": chat_model}
    plain = load_config(_cfg(tmp_path, models, task_dir, [GEN])).identity_json()
    assert load_config(_cfg(tmp_path, models, task_dir, [GEN], num_fewshot=None, apply_chat_template=False,
                            sample_seed=0)).identity_json() == plain
    for change in ({"num_fewshot": 1}, {"apply_chat_template": True}, {"system_instruction": SYSTEM},
                   {"limit": 3}, {"heldout_limit": 3}, {"sample_seed": 1},
                   {"tasks": [GEN | {"generation_kwargs": {"max_gen_toks": 2}}]}):
        tasks = change.pop("tasks", [GEN])
        assert load_config(_cfg(tmp_path, models, task_dir, tasks, **change)).identity_json() != plain, change


def test_search_with_chat_template_and_shots_runs_clean(tmp_path: Path, task_dir: Path,
                                                        arch_models: dict[str, dict[str, Path]]) -> None:
    """A short search of a tiny Llama with a ChatML template, 2 multi-turn shots, a system
    instruction and sampled documents: no trial fails, held-out re-scoring runs; resuming it
    with another system instruction is refused before any work."""
    models = arch_models["llama"]
    tasks = [GEN | {"generation_kwargs": {"max_gen_toks": 2}}, {"name": "ll_add"}]
    settings = {"num_fewshot": 2, "apply_chat_template": True, "system_instruction": SYSTEM,
                "fewshot_as_multiturn": True, "limit": 4, "heldout_limit": 6}
    cfg = _cfg(tmp_path, models, task_dir, tasks, **settings)
    db = f"sqlite:///{tmp_path / 'r.db'}"
    evomerge("search", str(cfg), "--storage", db, "--workers", "1", "--max-trials", "4", cwd=tmp_path)
    rows = query(tmp_path / "r.db", "select state, error, heldout_fitness from evomerge_candidates")
    states = [state for state, _, _ in rows]
    assert states.count("complete") == 4 and "failed" not in states, rows
    assert any(heldout is not None for _, _, heldout in rows), rows
    cfg = _cfg(tmp_path, models, task_dir, tasks, **settings | {"system_instruction": "Be brief."})
    proc = run_cli("search", str(cfg), "--storage", db, "--max-trials", "5", cwd=tmp_path)
    assert proc.returncode == 2 and "was started with a different config" in proc.stderr, proc.stderr
