"""Per-task evaluation settings on lm-eval tasks, and the study's fixed document sample.

lm-eval 0.4 takes few-shot counts and generation kwargs from each task's config, but the
chat template, system instruction and multi-turn few-shot only per ``evaluate`` call: the
evaluator groups tasks by :func:`prompt_key` and calls ``evaluate`` once per group.

The checks here run in the controller on tasks built as a worker builds them
(:func:`evomerge.evaluators.tasks.check_suite`), so a setting that lm-eval would ignore or
fail on is one line before any worker starts.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from evomerge.evaluators.spec import TaskError, TaskSpec

# lm-eval's own default ``fewshot_random_seed`` (simple_evaluate): few-shot examples are the
# same in every call, every worker and after a resume. lm-eval's sampler starts unseeded
# (``Random(None)``) and its draws advance per document, so it is reset before every build.
FEWSHOT_SEED = 1234


def prompt_key(spec: TaskSpec) -> tuple[bool, str | None, bool]:
    """The settings lm-eval takes per ``evaluate`` call, not per task."""
    return spec.apply_chat_template, spec.system_instruction, spec.fewshot_as_multiturn


def apply_settings(task: Any, spec: TaskSpec) -> None:
    """Put ``spec``'s few-shot count and generation overrides on a built lm-eval task."""
    if spec.num_fewshot is not None:  # explicit: wins over the task's own, 0 included
        task.set_config(key="num_fewshot", value=spec.num_fewshot)
    elif task.config.num_fewshot is None:
        task.set_config(key="num_fewshot", value=0)
    if spec.generation_kwargs and task.config.output_type == "generate_until":
        task.set_config(key="generation_kwargs", value={**(task.config.generation_kwargs or {}),
                                                        **spec.generation_kwargs})
    task.set_fewshot_seed(seed=FEWSHOT_SEED)


def check_settings(spec: TaskSpec, task: Any, heldout_split: str | None) -> None:
    """TaskError (one line) for a setting lm-eval would ignore, or few-shot examples drawn
    where they leak answers: from the scored document itself or from the held-out split."""
    output_type = task.config.output_type
    if spec.generation_kwargs and output_type != "generate_until":
        raise TaskError(f"task {spec.name!r}: generation_kwargs apply to generate_until tasks; it is a "
                        f"{output_type} task (lm-eval would ignore them)")
    shots = task.config.num_fewshot or 0
    if spec.fewshot_as_multiturn and shots == 0:
        raise TaskError(f"task {spec.name!r}: fewshot_as_multiturn needs few-shot examples (its num_fewshot is 0)")
    if shots == 0:
        return
    scored = task.config.test_split
    fewshot = task.config.fewshot_config
    if fewshot.split is None and fewshot.samples is not None:
        return  # fixed examples written in the task config
    source = fewshot.split or task.config.training_split or task.config.validation_split or scored
    if source == scored and fewshot.split != scored:  # lm-eval leaves the scored doc out only then
        raise TaskError(f"task {spec.name!r}: num_fewshot {shots} would draw examples from the scored split "
                        f"{scored!r} itself, answers included; set fewshot_split (or training_split) in its config")
    if heldout_split is not None and source == heldout_split and scored != heldout_split:
        raise TaskError(f"task {spec.name!r}: num_fewshot {shots} would show the search its held-out documents "
                        f"(few-shot split {source!r}); set another fewshot_split in its config")
    pool = len(task.sampler.fewshot_docs()) - (1 if source == scored else 0)
    if pool < shots:
        raise TaskError(f"task {spec.name!r}: num_fewshot {shots} but its few-shot split {source!r} has "
                        f"{pool} usable documents")


def check_chat_template(specs: tuple[TaskSpec, ...], tokenizer_dir: Path, model: str) -> None:
    """The tokenizer the workers use renders a chat, with the system instruction where one
    is set (lm-eval silently drops the system message when the template refuses it)."""
    chat = [s for s in specs if s.apply_chat_template]
    if not chat:
        return
    import jinja2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise TaskError(f"task {chat[0].name!r}: apply_chat_template, but the tokenizer of model {model!r} "
                        "has no chat template")
    for spec in chat:
        if spec.system_instruction is None:
            continue
        messages = [{"role": "system", "content": spec.system_instruction}, {"role": "user", "content": "?"}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.exceptions.TemplateError:
            text = ""
        if spec.system_instruction not in text:
            raise TaskError(f"task {spec.name!r}: the chat template of model {model!r} drops the system message; "
                            "system_instruction would be ignored")


class DocSample(list[int]):
    """Indices of the documents scored, ascending (lm-eval's ``samples``), with a set for
    the membership test lm-eval makes per document."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(sorted(indices))
        self._members = frozenset(indices)

    def __contains__(self, index: object) -> bool:
        return index in self._members


def document_order(count: int, limit: int | None, seed: int, task: str, split: str) -> list[int]:
    """The documents a split scores, in a random order fixed by the study's stored ``seed``,
    the task and the split only (the same for every candidate, worker and resume): ``limit``
    of the ``count`` documents, or all of them. Racing (evaluators/racing.py) scores a
    prefix of this order first: a uniform random subset of the sample."""
    rng = random.Random(f"{seed}:{task}:{split}")  # str seeds hash with SHA-512: stable across processes
    return rng.sample(range(count), count if limit is None else min(limit, count))


def sample_docs(count: int, limit: int | None, seed: int, task: str, split: str) -> DocSample | None:
    """lm-eval's ``samples`` for a split: the documents of :func:`document_order`; None
    (every document) when ``limit`` does not cut."""
    if limit is None or limit >= count:
        return None
    return DocSample(document_order(count, limit, seed, task, split))
