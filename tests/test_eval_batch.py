"""evaluation.batch_size: auto finds the largest batch that fits per task, keeps it for the
worker's life, halves it on an out-of-memory error, and scores like batch 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from evomerge.evaluators.batching import (CPU_BATCH, GPU_MAX_BATCH, BatchCache, is_out_of_memory, largest_fitting,
                                          planned_batch)
from evomerge.evaluators.harness import Evaluator
from evomerge.evaluators.lm_eval_adapter import lm_class
from evomerge.evaluators.spec import TaskSpec, TaskSuite
from evomerge.search.config import ConfigError, load_config
from evomerge.workers.materialize import Materializer
from evomerge.workers.memory_plan import GiB, Machine, Workload, plan, read_shape
from evomerge.workers.sources import validate_sources
from tests.helpers import ROOT

DEMO = ROOT / "demo"


class Device:
    """A device that holds ``limit`` sequences: ``fits`` raises CUDA's out-of-memory error
    above it, as a real allocation does, and counts what it was asked."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.asked: list[int] = []

    def fits(self, batch: int) -> None:
        self.asked.append(batch)
        if batch > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch} sequences")


# --- the config -------------------------------------------------------------------------------

def _config(tmp_path: Path, batch_size: object) -> Path:
    raw = (DEMO / "demo.yaml").read_text().replace("task_paths: [tasks]", f"task_paths: [{DEMO / 'tasks'}]")
    raw = raw.replace("path: models/", f"path: {DEMO / 'models'}/")
    lines = [line for line in raw.splitlines() if "batch_size" not in line]
    if batch_size is not None:
        lines.insert(lines.index("evaluation:") + 1, f"  batch_size: {json.dumps(batch_size)}")
    (tmp_path / "c.yaml").write_text("\n".join(lines) + "\n")
    return tmp_path / "c.yaml"


@pytest.mark.parametrize("value, parsed", [(None, "auto"), ("auto", "auto"), (7, 7)])
def test_batch_size_is_auto_by_default_or_an_int(tmp_path: Path, value: object, parsed: object) -> None:
    assert load_config(_config(tmp_path, value)).evaluation.batch_size == parsed


@pytest.mark.parametrize("value", [0, True, "big", 2.0])
def test_a_bad_batch_size_is_one_line(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match="evaluation.batch_size: Input should be a valid batch size: an integer"):
        load_config(_config(tmp_path, value))


# --- the search -------------------------------------------------------------------------------

@pytest.mark.parametrize("limit, start", [(37, 512), (1, 64), (64, 64), (100, 64), (255, 256), (3, 5)])
def test_the_largest_batch_that_fits_is_found(limit: int, start: int) -> None:
    device = Device(limit)
    assert largest_fitting(device.fits, start) == min(limit, start)
    assert len(device.asked) <= 2 * start.bit_length()  # halving, then bisecting: logarithmic


def test_nothing_fits_and_other_errors_propagate() -> None:
    with pytest.raises(torch.OutOfMemoryError):
        largest_fitting(Device(0).fits, 64)

    def broken(batch: int) -> None:
        raise ValueError("not a memory problem")
    with pytest.raises(ValueError):
        largest_fitting(broken, 64)
    assert is_out_of_memory(RuntimeError("HIP out of memory")) and not is_out_of_memory(RuntimeError("shape"))


def test_the_cache_finds_once_per_task_and_halves_on_oom() -> None:
    device = Device(37)
    cache = BatchCache(start=512)
    a, b = ("a", "cuda:0", "shape"), ("b", "cuda:0", "shape")
    assert cache.batch(a, 100, device.fits) == 37
    probes = len(device.asked)
    assert cache.batch(a, 100, device.fits) == 37 and cache.batch(a, 60, device.fits) == 37
    assert len(device.asked) == probes  # reused: not probed again for this task
    assert cache.batch(b, 50, device.fits) == 37 and len(device.asked) > probes  # another task: probed
    probes = len(device.asked)
    assert cache.batch(a, 120, device.fits) == 37 and len(device.asked) > probes  # a longer request: probed
    # memory taken by someone else: the run halves until it fits, and the cache keeps that
    device.limit = 10
    ran = cache.run([a, b], 37, lambda batch: device.fits(batch) or batch)
    assert ran == 9 and device.asked[-3:] == [37, 18, 9]
    assert cache.found()[a].batch == cache.found()[b].batch == 9
    device.limit = 0
    with pytest.raises(torch.OutOfMemoryError):  # at batch 1 nothing is left to halve
        cache.run([a], 9, device.fits)


def test_planned_batch_caps_auto_per_device() -> None:
    assert planned_batch("auto") == CPU_BATCH and planned_batch("auto", gpu=True) == GPU_MAX_BATCH
    assert planned_batch("auto", fits=5) == 5 and planned_batch("auto", fits=10**6, gpu=True) == GPU_MAX_BATCH
    assert planned_batch(64, fits=37) == 37 and planned_batch(8) == 8


def test_the_memory_plan_reports_the_auto_batch() -> None:
    """`evomerge plan` for auto: what fits at the planned length, capped as a worker caps it."""
    cfg = load_config(DEMO / "demo.yaml")
    shape = read_shape(cfg.base_model, DEMO / "models" / "base")
    cpu = plan(shape, Workload(3, "float32", 1, "auto", 64), Machine(24 * GiB))
    assert cpu.problem is None and cpu.batch == CPU_BATCH
    gpu = plan(shape, Workload(3, "float32", 1, "auto", 64), Machine(24 * GiB, 1, 80 * GiB))
    assert gpu.batch == GPU_MAX_BATCH
    fixed = gpu.worker_gpu_bytes - GPU_MAX_BATCH * gpu.sequence_bytes  # model, sources, scratch, context
    tight = plan(shape, Workload(3, "float32", 1, "auto", 64),
                 Machine(24 * GiB, 1, fixed + 100 * gpu.sequence_bytes + gpu.sequence_bytes // 2))
    assert tight.batch == 100  # the largest that fits


# --- real evaluation --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generation_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's cipher_a as a generate_until task (greedy, exact match), beside its
    loglikelihood tasks."""
    root = tmp_path_factory.mktemp("gen_tasks")
    data = DEMO / "tasks" / "data"
    (root / "cipher_a_gen.yaml").write_text(
        "task: cipher_a_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    search: {data / 'cipher_a_search.jsonl'}\n    heldout: {data / 'cipher_a_heldout.jsonl'}\n"
        "test_split: search\noutput_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return root


def _suite(generation_tasks: Path) -> TaskSuite:
    return TaskSuite((TaskSpec("cipher_a"), TaskSpec("cipher_mix"), TaskSpec("cipher_a_gen", "exact_match")),
                     (DEMO / "tasks", generation_tasks), "search", "heldout", limit=60)


@torch.no_grad()
def _materializer() -> Materializer:
    """A worker's model holding a merge of the demo's experts: base + 0.8 of each task vector
    (scores neither 0 nor 1)."""
    cfg = load_config(DEMO / "demo.yaml")
    mat = Materializer(validate_sources(cfg.sources()), cfg.base_model)
    base, a, b = (mat.sources[name] for name in ("base", "cipher_a", "cipher_b"))
    for key, param in mat.params.items():
        param.copy_(base[key] + 0.8 * (a[key] - base[key]) + 0.8 * (b[key] - base[key]))
    return mat


class MemoryLimit:
    """A forward pre-hook on the model: a forward pass of more than ``limit`` sequences raises
    CUDA's out-of-memory error, as a device of that size would."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {ids.shape[0]} sequences")


def test_auto_scores_like_batch_1_and_is_found_once_per_task(generation_tasks: Path) -> None:
    """A real lm-eval scoring of loglikelihood and generation tasks on the demo's tiny model:
    auto (probed here on the CPU against a device that holds 12 sequences) gives batch 1's
    scores; the batch is found once per task and reused for the next candidate; memory taken
    away later halves it, and the candidate is still scored."""
    mat = _materializer()
    suite = _suite(generation_tasks)
    one = Evaluator(suite, mat.model, mat.tokenizer, batch_size=1).score()
    assert one["cipher_a"] > 0 and one["cipher_a_gen"] > 0 and 0 < one["cipher_mix"] < 1  # not all trivial

    cpu = Evaluator(suite, mat.model, mat.tokenizer)  # auto on the CPU: the fixed CPU batch
    assert cpu.lm.batch_size == CPU_BATCH and cpu.score() == one

    limit = MemoryLimit(12)
    handle = mat.model.register_forward_pre_hook(limit, with_kwargs=True)
    try:
        lm = lm_class()(batch="auto", pretrained=mat.model, tokenizer=mat.tokenizer, device="cpu")
        auto = Evaluator(suite, mat.model, mat.tokenizer, lm=lm)
        assert auto.score() == one
        found = {key[0]: kept.batch for key, kept in lm.sizes.found().items()}
        assert found == {"cipher_a": 12, "cipher_mix": 12, "cipher_a_gen": 12}
        before = lm.sizes.found()
        assert auto.score() == one and lm.sizes.found() == before  # the next candidate: no new probe
        limit.limit = 5  # another worker took memory: 12 -> 6 -> 3
        assert auto.score() == one
        assert {kept.batch for kept in lm.sizes.found().values()} == {3}
    finally:
        handle.remove()


def test_generation_uses_the_kv_cache(generation_tasks: Path) -> None:
    """The worker turns the model's cache off for scoring passes; lm-eval's generation still
    decodes with one (every step after the first feeds one token and the cache)."""
    mat = _materializer()
    mat.model.config.use_cache = False  # as workers/actor.py leaves it
    steps: list[tuple[int, bool]] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 names it "cache"
        steps.append((kwargs["input_ids"].shape[1], cache is not None and cache.get_seq_length() > 0))

    suite = TaskSuite((TaskSpec("cipher_a_gen", "exact_match"),), (generation_tasks,), "search", limit=4)
    evaluator = Evaluator(suite, mat.model, mat.tokenizer, batch_size=4)
    handle = mat.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        evaluator.score()
    finally:
        handle.remove()
    assert steps[0][0] > 1 and not steps[0][1]  # the prompt, no cache yet
    assert len(steps) > 2 and all(length == 1 and cached for length, cached in steps[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_worker_model_has_sdpa_attention_in_its_dtype(dtype: torch.dtype) -> None:
    cfg = load_config(DEMO / "demo.yaml")
    mat = Materializer(validate_sources(cfg.sources()), cfg.base_model, dtype)
    assert mat.model.config._attn_implementation == "sdpa"
    assert {p.dtype for p in mat.model.parameters()} == {dtype}
