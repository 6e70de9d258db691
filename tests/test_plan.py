"""The memory plan (workers/memory_plan.py, `evomerge plan`, the check that starts a search):
from headers only, on the demo's models and on header-only Llamas of 1 B, 7 B and 70 B whose
weights are holes; a search that cannot fit is refused in one line before anything happens."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.search.config import load_config
from evomerge.search.app.planning import check_search, plan_search, render
from evomerge.workers.kernels.band_cuts import CUT_ROW_BYTES
from evomerge.workers.memory_plan import (GPU_CONTEXT, PROCESS, GiB, Machine, ModelShape, PlanError,
                                          Workload, gib, plan, read_shape, sequence_bytes)
from tests.helpers import DEMO, ROOT, cli_env

HEADERS = ROOT / "benchmarks" / "header_models.py"
DEMO_CONFIG = DEMO / "demo.yaml"


@pytest.fixture(scope="module")
def hm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("header_models", HEADERS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def big(hm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Search configs over a header-only base and two experts: 7 B (one file each) and 70 B (sharded)."""
    out = tmp_path_factory.mktemp("headers")
    return {size: hm.search_config(out / size, size) for size in ("7b", "70b")}


def _io() -> tuple[int, int]:
    """Bytes this process read through read() and its resident file-backed memory."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(io["rchar"]), int(status["RssFile"].split()[0]) * 1024


def test_demo_plans_cpu_workers_with_the_sources_in_host_memory() -> None:
    import torch
    from safetensors.torch import load_file

    cfg = load_config(DEMO_CONFIG)
    result = plan_search(cfg, Machine(8 * GiB))
    numel = sum(t.numel() for t in load_file(DEMO / "models" / "base" / "model.safetensors").values())
    largest = max(load_file(DEMO / "models" / "base" / "model.safetensors").values(), key=torch.Tensor.numel)
    assert result.problem is None and result.placement == "host" and result.shared_host_bytes == 3 * result.source_bytes
    assert result.source_bytes == 4 * numel  # float32 workers
    assert result.scratch_bytes == largest.numel() * 4 * (2 + 2)  # float32 x (experts + 2)
    assert result.workload.seq_len == 32  # the demo's max positions, below the 4096 cap
    assert result.batch == cfg.evaluation.batch_size == 200
    assert result.worker_host_bytes == PROCESS + result.source_bytes + result.scratch_bytes + 200 * result.sequence_bytes
    table = render(result).splitlines()
    assert [line.split("  ")[0] for line in table] == [
        "sources", "machine", "bytes per source", "sources live in", "merge scratch", "one sequence",
        "evaluation batch", "host per worker", "workers per node"]


def test_search_check_on_the_demo_is_silent_and_skipped_on_a_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(DEMO_CONFIG)
    result = check_search(cfg, 2, None)
    assert result is not None and result.problem is None
    assert check_search(cfg, 2, "10.0.0.1:6379") is None  # the cluster's nodes are not this machine
    assert capsys.readouterr() == ("", "")


def test_search_check_with_gpus_says_one_line_and_skips_without_them(
        big: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from evomerge.search.app import planning

    cfg = load_config(big["7b"])
    cfg = cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"num_gpus": 1.0})})
    monkeypatch.setattr(planning, "host_memory", lambda: 128 * GiB)  # whatever this machine has
    monkeypatch.setattr(planning, "local_gpus", lambda: [])
    assert check_search(cfg, 1, None) is None  # GPU workers asked for, no GPU seen here: nothing to plan
    monkeypatch.setattr(planning, "local_gpus", lambda: [139 * GiB])
    result = check_search(cfg, 1, None)
    assert result is not None and result.placement == "device" and result.machine.gpus == 1
    err = capsys.readouterr().err.splitlines()
    per_worker = gib(result.worker_gpu_bytes)
    assert err == [f"memory plan: sources on device, batch {result.batch}, {per_worker} of GPU per worker"]
    with pytest.raises(PlanError, match=r"^GPU memory: one worker needs .* short"):
        check_search(cfg, 9, None)  # nine workers on one GPU: 15.4 GiB each


def test_header_only_1b_llama_is_read_without_reading_its_data(hm: ModuleType, tmp_path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = hm.llama_folder(tmp_path / "1b", "1b")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**hm.SHAPES["1b"], tie_word_embeddings=False))
    params = sum(t.numel() for t in model.state_dict().values())
    file = folder / "model.safetensors"
    assert 0.9e9 < params < 1.3e9 and file.stat().st_size > 2 * params  # the full size, as a hole
    assert file.stat().st_blocks * 512 < 1 << 20  # nothing of it written
    read_before, resident_before = _io()
    shape = read_shape("1b", folder)
    read_after, resident_after = _io()
    assert read_after - read_before < 1 << 20 and resident_after - resident_before < 16 << 20
    assert shape.params == params and shape.file_bytes == 2 * params and shape.file_dtypes == ("BF16",)
    assert (shape.largest, shape.largest_shape) == ("lm_head.weight", (32000, 2048))
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.max_length) == (22, 4, 64, 2048)


def test_7b_and_70b_headers_give_the_known_sizes(big: dict[str, Path]) -> None:
    cfg7, cfg70 = load_config(big["7b"]), load_config(big["70b"])
    seven = plan_search(cfg7, Machine(128 * GiB, 1, 139 * GiB))
    seventy = plan_search(cfg70, Machine(2048 * GiB, 8, 139 * GiB), workers=8)
    assert (big["70b"].parent / "base" / "model.safetensors.index.json").is_file()  # sharded, read through the index
    assert seven.shape.params == 6_738_415_616 and seventy.shape.params == 68_976_648_192  # Llama-2's
    assert seven.source_bytes == 2 * seven.shape.params  # bf16
    # per sequence of 4096 tokens: one layer's live entries (the MLP's 3I) + the MHA KV cache
    assert seven.sequence_bytes == 4096 * 2 * (2 * 4096 + 3 * 11008 + 2 * 32 * 4096)
    assert seven.placement == "device" and seven.problem is None
    fixed = 4 * seven.source_bytes + seven.scratch_bytes + GPU_CONTEXT
    assert seven.batch == (139 * GiB - fixed) // seven.sequence_bytes < 64
    assert seven.worker_gpu_bytes == fixed + seven.batch * seven.sequence_bytes <= 139 * GiB
    assert seventy.placement == "host" and seventy.problem is None and seventy.workers_per_gpu == 1
    assert seventy.shared_host_bytes == 3 * seventy.source_bytes and seventy.batch >= 1


def test_70b_on_one_gpu_with_a_small_host_does_not_fit(big: dict[str, Path]) -> None:
    cfg = load_config(big["70b"])
    small_host = plan_search(cfg, Machine(128 * GiB, 1, 139 * GiB))
    assert small_host.problem is not None and small_host.problem.startswith("host memory: 1 GPU worker(s) need")
    small_gpu = plan_search(cfg, Machine(2048 * GiB, 1, 100 * GiB))
    assert small_gpu.problem is not None and small_gpu.problem.startswith("GPU memory: one worker needs")
    short = small_gpu.source_bytes + small_gpu.scratch_bytes + GPU_CONTEXT + small_gpu.sequence_bytes - 100 * GiB
    assert f"{short / GiB:.2f} GiB short" in small_gpu.problem
    # on the disk, not the host, when the host can build the model but not hold the sources too
    disk = plan_search(cfg, Machine(200 * GiB, 1, 139 * GiB))
    assert disk.placement == "disk" and disk.problem is None and disk.shared_host_bytes == 0


def test_plan_command_prints_the_table_and_json(big: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from evomerge.search.app.cli import main

    args = ["plan", str(big["7b"]), "--gpus", "8", "--gpu-memory", "139", "--host-memory", "2048", "--workers", "16"]
    assert main([*args, "--json"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped["workers_per_gpu"] == 2 and dumped["problem"] is None and dumped["placement"] == "device"
    assert dumped["machine"] == {"host_bytes": 2048 * GiB, "gpus": 8, "gpu_bytes": 139 * GiB}
    assert main(args) == 0
    table = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    assert table["workers per GPU"].strip() == f"2 (up to {dumped['max_workers_per_gpu']} fit at batch 1)"
    assert table["evaluation batch"].strip() == f"{dumped['batch']} (evaluation.batch_size auto)"  # the default


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    probe = ("import json, sys\nfrom evomerge.search.app.cli import main\nstatus = main(sys.argv[1:])\n"
             "ray = sys.modules.get('ray')\nprint(json.dumps({'status': status, 'ray': bool(ray and ray.is_initialized())}))")
    return subprocess.run([sys.executable, "-c", probe, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=cli_env(RAY_TMPDIR=str(cwd / "ray")))


def test_a_search_that_cannot_fit_is_refused_in_one_line_before_anything(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "search", str(DEMO_CONFIG), "--storage", "sqlite:///plan.db", "--workers", "1000000")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = proc.stderr.strip().splitlines()
    assert result == {"status": 2, "ray": False}, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("evomerge: error: host memory: 1000000 CPU worker(s) need"), lines
    assert " short (at most " in lines[0] and proc.stdout.count("\n") == 1  # nothing but the probe's line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no database, no Ray session folder


@pytest.mark.parametrize("command", [
    ["--host-memory", "0.01"],
    ["--gpus", "1", "--gpu-memory", "0.001"],
    ["--gpus", "1", "--gpu-memory", "80", "--host-memory", "0.1"],
])
def test_plan_that_cannot_fit_exits_2_with_one_line(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from evomerge.search.app.cli import main

    assert main(["plan", str(DEMO_CONFIG), *command]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("evomerge: error: ")
    assert "memory: " in err and " short" in err


SHAPE = ModelShape(params=10**9, float_params=10**9, other_bytes=0, file_bytes=2 * 10**9, file_dtypes=("BF16",),
                   largest="embed", largest_shape=(32000, 2048), hidden_size=2048, layers=22, kv_heads=4,
                   head_dim=64, intermediate_size=5632, vocab_size=32000, max_length=2048)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 5), st.sampled_from(["float32", "bfloat16"]), st.integers(1, 32), st.integers(1, 256),
       st.sampled_from([128, 2048, 8192]), st.sampled_from(["auto", "device", "host"]), st.integers(0, 8),
       st.integers(1, 200), st.integers(1, 4096))
def test_a_plan_that_fits_fits(sources: int, dtype: str, workers: int, batch: int, seq: int, where: str,
                               gpus: int, gpu_gib: int, host_gib: int) -> None:
    """Whatever the inputs: the batch is at most the configured one, and a plan without a
    problem keeps every GPU's workers and the node's host memory within their sizes."""
    work = Workload(sources, dtype, workers, batch, seq, where)  # type: ignore[arg-type]
    result = plan(SHAPE, work, Machine(host_gib * GiB, gpus, gpu_gib * GiB))
    assert 0 <= result.batch <= batch
    assert result.sequence_bytes == sequence_bytes(SHAPE, dtype, seq)
    if result.problem is not None:
        assert "short" in result.problem and "\n" not in result.problem
        return
    assert result.batch >= 1
    assert result.shared_host_bytes + workers * result.worker_host_bytes <= host_gib * GiB
    if gpus:
        assert math.ceil(workers / gpus) * result.worker_gpu_bytes <= gpu_gib * GiB
        assert result.workers_per_gpu <= result.max_workers_per_gpu
    assert workers <= result.max_workers_per_node
    assert dataclasses.replace(result) == result  # frozen values, comparable


def test_trimming_methods_plan_their_device_cuts() -> None:
    """On a GPU (or in float16) TIES and Breadcrumbs select their cuts on the device: the scratch
    is the larger of the float32 merge's and CUT_ROW_BYTES per entry and cut (one cut per
    expert, two for Breadcrumbs); DARE-TIES and CPU workers in float32 or bf16 (the native
    selection) keep the float32 merge's."""
    n, experts = math.prod(SHAPE.largest_shape), 2
    gpu = Machine(512 * GiB, 1, 141 * GiB)

    def scratch(methods: tuple[str, ...], machine: Machine = gpu, dtype: str = "bfloat16") -> int:
        return plan(SHAPE, Workload(experts + 1, dtype, 1, 8, 128, methods=methods), machine).scratch_bytes

    fused = 4 * (experts + 2) * n
    assert scratch(("dare_ties",)) == scratch(()) == fused
    assert scratch(("ties",)) == CUT_ROW_BYTES * experts * n > fused
    assert scratch(("task_arithmetic", "breadcrumbs_ties")) == 2 * scratch(("ties",))
    assert scratch(("breadcrumbs_ties",), Machine(512 * GiB)) == fused  # CPU, bf16: the native selection
    assert scratch(("ties",), Machine(512 * GiB), "float16") == scratch(("ties",))  # no native float16 cuts
