"""The memory plan: where a search's sources live and how many workers and sequences fit,
computed from file headers and configs before any weight is loaded or any worker starts.

:func:`read_shape` reads what the plan needs of the sources (tensor dtypes and shapes from
the safetensors headers, via :func:`evomerge.workers.sources.inspect_tensors`; sizes from
config.json); :func:`plan` is pure arithmetic over frozen values. Sizes are bytes.

What one worker holds (``b``: bytes per entry of the worker's dtype):

- its working model, the candidate: ``P·b`` (``P`` parameters, from the headers);
- the sources, ``n·P·b``: on its GPU when they fit there beside everything else ("device"),
  else in host memory shared by the node's workers and streamed per tensor ("host"), else
  memory-mapped from disk and read again per candidate ("disk"). Host copies are shared only
  when the files already hold the worker's dtype; a cast makes one copy per worker;
- merge scratch, for the largest tensor: its float32 copies, × (experts + 2) (16-bit merges
  compute in float32 and round once); where the search may run a method that trims by
  magnitude (TIES, Breadcrumbs) on a GPU or in float16, the cuts selected on the device
  instead when they need more: ``CUT_ROW_BYTES`` per entry and cut selected in one graph (one
  cut per expert, two for Breadcrumbs; groups of cuts that stay within ``CUT_SCRATCH``), an
  upper bound from the buffers of ``workers/kernels/band_cuts.select`` (on the CPU, float32
  and bf16 take the native selection, whose scratch is small);
- per sequence of ``L`` tokens: ``L·b·(layer + max(kv, 2V))``, where ``layer = 2h +
  max(2h + 2·kvh·d, 3I)`` entries per token are live inside one decoder layer (residual,
  its norm, then q/k/v/attention output or the MLP's gate/up/product; SDPA, so no L×L
  scores), ``kv = 2·layers·kvh·d`` entries per token of KV cache (generation) and ``2V``
  the logits and their log-softmax of every position (lm-eval's scoring passes, which keep
  no KV cache); h hidden size, I intermediate size, kvh KV heads, d head size, V vocabulary.
  ``L`` is lm-eval's max length (the config's max positions, else 2048), capped at
  :data:`DEFAULT_MAX_LENGTH` unless asked: the worst case of a batch, padded to its longest;
- a process: :data:`GPU_CONTEXT` on its GPU (CUDA context, kernels), :data:`PROCESS` on
  the host (Python, torch, lm-eval), plus on the host, for a GPU worker, the model as it is
  built before it moves to the GPU (start-up).

The evaluation batch is the configured one, or the largest that fits when that does not;
for ``auto`` what fits capped as a worker caps it (:func:`evomerge.evaluators.batching.planned_batch`:
32 on the CPU, 512 on a GPU), at the planned length: a worker finds its batch per task, at the
task's own longest request, so a task of shorter prompts gets more.
A worker's GPU share is the GPU divided among the workers placed on it (``ceil(workers /
gpus)``); workers never span GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from evomerge.evaluators.batching import BatchSize, planned_batch
from evomerge.workers.kernels.band_cuts import CUT_ROW_BYTES, group_size
from evomerge.workers.sources import inspect_tensors, read_config

GiB = 1 << 30
DEFAULT_MAX_LENGTH = 4096  # tokens per sequence planned for unless asked (lm-eval prompts are shorter)
GPU_CONTEXT = GiB // 2  # CUDA context, cuBLAS workspace and kernels of one worker process
PROCESS = GiB // 2  # a worker process on the host: Python, torch, transformers, lm-eval, Ray (DESIGN §7)
# Cuts per expert of the methods that trim by magnitude (workers/kernels/sparsify.cut_wants).
CUTS_PER_EXPERT = {"ties": 1, "breadcrumbs": 2, "breadcrumbs_ties": 2}
HF_DEFAULT_MAX_LENGTH = 2048  # lm-eval's max length when the config names none
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_FILE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = {"F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2"}
_FILE_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
Placement = Literal["device", "host", "disk"]


class PlanError(ValueError):
    """A search that cannot fit; the message is one line saying what and by how much."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of the sources' common architecture (headers and config.json)."""

    params: int  # entries of every tensor in the files
    float_params: int  # entries of the floating-point ones (cast to the workers' dtype on load)
    other_bytes: int  # bytes of the others (integer buffers), kept as they are
    file_bytes: int  # bytes of every tensor as stored
    file_dtypes: tuple[str, ...]  # safetensors dtypes of the floating tensors, e.g. ("BF16",)
    largest: str  # the tensor with the most entries
    largest_shape: tuple[int, ...]
    hidden_size: int
    layers: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_length: int  # lm-eval's: the config's max positions, else 2048

    def bytes_in(self, dtype: str) -> int:
        """A model's bytes held in ``dtype`` (float tensors are cast to it; others keep theirs)."""
        return self.float_params * DTYPE_BYTES[dtype] + self.other_bytes

    @property
    def largest_numel(self) -> int:
        return math.prod(self.largest_shape)


@dataclass(frozen=True)
class Workload:
    """What the search asks of each worker."""

    sources: int  # models every worker holds (base and experts)
    dtype: str  # the workers' dtype (workers.dtype)
    workers: int
    batch_size: BatchSize  # evaluation.batch_size
    seq_len: int  # tokens per sequence planned for
    placement: Literal["auto", "device", "host"] = "auto"  # workers.sources
    methods: tuple[str, ...] = ()  # the merge methods the search may run (their scratch differs)


@dataclass(frozen=True)
class Machine:
    """The hardware planned for: ``gpus`` 0 means CPU workers."""

    host_bytes: int
    gpus: int = 0
    gpu_bytes: int = 0


@dataclass(frozen=True)
class Plan:
    """Where everything lives and what fits; ``problem`` is None when the search fits."""

    shape: ModelShape
    workload: Workload
    machine: Machine
    source_bytes: int  # one source in the workers' dtype
    placement: Placement
    scratch_bytes: int
    sequence_bytes: int  # one sequence of seq_len tokens
    batch: int  # evaluation batch that fits (<= workload.batch_size, or auto's cap); 0 when not even one
    worker_gpu_bytes: int  # one worker on its GPU at that batch (0: CPU workers)
    worker_host_bytes: int  # one worker's own host memory at that batch
    shared_host_bytes: int  # host memory the node's workers share (sources in host memory)
    workers_per_gpu: int  # asked: ceil(workers / gpus); 0 on CPU
    max_workers_per_gpu: int  # that fit on one GPU at batch 1
    max_workers_per_node: int  # that fit on the node (GPUs and host) at batch 1
    problem: str | None = None
    scratch_cuts: int = 0  # cuts per graph where the device cuts sized the scratch; 0: the float32 merge


def read_shape(name: str, folder: Path, allow_pickle: bool = False) -> ModelShape:
    """The shape of source ``name`` at ``folder`` from its config and file headers (no weights read)."""
    infos = inspect_tensors(name, folder, allow_pickle)
    config = read_config(name, folder)
    text = getattr(config, "text_config", None) or config  # multimodal configs nest the decoder's
    lacking = [f for f in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
               if not isinstance(getattr(text, f, None), int)]
    if lacking:
        raise PlanError(f"model {name!r}: its config has no integer {lacking[0]}; no memory plan for it")
    numel = {key: math.prod(info.shape) for key, info in infos.items()}
    floats = [key for key, info in infos.items() if info.dtype in _FLOATS]
    largest = max(sorted(numel), key=lambda key: numel[key])  # the first by name among equals
    hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
    length = next((getattr(text, a) for a in ("n_positions", "max_position_embeddings", "n_ctx")
                   if isinstance(getattr(text, a, None), int)), HF_DEFAULT_MAX_LENGTH)
    size = {key: numel[key] * _FILE_BYTES.get(info.dtype, 4) for key, info in infos.items()}
    return ModelShape(
        params=sum(numel.values()), float_params=sum(numel[k] for k in floats),
        other_bytes=sum(size[k] for k in infos if k not in floats), file_bytes=sum(size.values()),
        file_dtypes=tuple(sorted({infos[k].dtype for k in floats})), largest=largest,
        largest_shape=infos[largest].shape, hidden_size=hidden,
        layers=int(text.num_hidden_layers), kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        vocab_size=int(text.vocab_size), max_length=int(length))


def sequence_bytes(shape: ModelShape, dtype: str, tokens: int) -> int:
    """Evaluation memory of one sequence of ``tokens`` (the module docstring's formula)."""
    h, kv_dim = shape.hidden_size, shape.kv_heads * shape.head_dim
    layer = 2 * h + max(2 * h + 2 * kv_dim, 3 * shape.intermediate_size)
    kv_cache = 2 * shape.layers * kv_dim
    return tokens * DTYPE_BYTES[dtype] * (layer + max(kv_cache, 2 * shape.vocab_size))


def merge_scratch(shape: ModelShape, work: Workload, gpu: bool) -> tuple[int, int]:
    """Bytes one merge of the largest tensor holds beside its sources and output (the module
    docstring's rule): the float32 merge's, or the device cuts' where they need more; and the
    cuts per graph in that case (else 0)."""
    experts, n = work.sources - 1, shape.largest_numel
    fused = 4 * (experts + 2) * n
    cuts = max((CUTS_PER_EXPERT.get(m, 0) for m in work.methods), default=0) * experts
    if not cuts or not (gpu or work.dtype == "float16"):
        return fused, 0
    per_graph = group_size(cuts, n)
    return (fused, 0) if fused >= CUT_ROW_BYTES * per_graph * n else (CUT_ROW_BYTES * per_graph * n, per_graph)


def plan(shape: ModelShape, work: Workload, machine: Machine) -> Plan:
    """Where the sources live, the batch and workers that fit, and what does not (``problem``)."""
    one = shape.bytes_in(work.dtype)
    sources = work.sources * one
    scratch, cuts = merge_scratch(shape, work, machine.gpus > 0)
    seq = sequence_bytes(shape, work.dtype, work.seq_len)
    # host copies are the files' own pages (shared) only when no cast is needed
    shared = shape.file_dtypes in ((), (_FILE_DTYPE[work.dtype],))
    planned = (_gpu_plan if machine.gpus else _cpu_plan)(shape, work, machine, one, sources, scratch, seq, shared)
    return replace(planned, scratch_cuts=cuts)


def _cpu_plan(shape: ModelShape, work: Workload, machine: Machine, one: int, sources: int, scratch: int,
              seq: int, shared: bool) -> Plan:
    """CPU workers: everything in host memory, the sources once per node when no cast is needed
    (else a cast copy per worker); mapped from disk when the node cannot hold them."""
    own = PROCESS + one + scratch + (0 if shared else sources)
    fits_in_memory = not shared or sources + work.workers * (own + seq) <= machine.host_bytes
    placement: Placement = "host" if fits_in_memory else "disk"
    common = sources if shared and placement == "host" else 0
    fit = max((machine.host_bytes - common - work.workers * own) // (work.workers * seq), 0)
    batch = planned_batch(work.batch_size, fit)
    most = max((machine.host_bytes - common) // (own + seq), 0)
    problem = None
    if batch < 1:
        problem = (f"host memory: {work.workers} CPU worker(s) need {gib(own + seq)} each at batch 1 "
                   f"({_parts(work, one, scratch, seq, sources, shared)} + process {gib(PROCESS)})"
                   f"{_beside(common)}; the machine has {gib(machine.host_bytes)}: "
                   f"{gib(common + work.workers * (own + seq) - machine.host_bytes)} short "
                   f"(at most {most} worker(s) fit)")
    return Plan(shape, work, machine, one, placement, scratch, seq, batch, 0, own + batch * seq, common,
                0, 0, most, problem)


def _gpu_plan(shape: ModelShape, work: Workload, machine: Machine, one: int, sources: int, scratch: int,
              seq: int, shared: bool) -> Plan:
    """GPU workers: the candidate, scratch and evaluation on the GPU; the sources there too when
    they fit beside them, else in host memory (once per node when no cast is needed), else
    mapped from disk."""
    per_gpu = math.ceil(work.workers / machine.gpus)
    share = machine.gpu_bytes // per_gpu
    streamed = one + scratch + GPU_CONTEXT  # on the GPU without the sources
    on_device = work.placement == "device" or (work.placement == "auto" and sources + streamed + seq <= share)
    built = PROCESS + one  # the model is built on the host, then moved (start-up)
    placement: Placement = "device" if on_device else \
        "host" if not shared or sources + work.workers * built <= machine.host_bytes else "disk"
    common = sources if shared and placement == "host" else 0
    own_host = built + (sources if placement == "host" and not shared else 0)
    fixed = streamed + (sources if on_device else 0)
    batch = planned_batch(work.batch_size, max((share - fixed) // seq, 0), gpu=True)
    most_gpu = max(machine.gpu_bytes // (fixed + seq), 0)
    most_host = max((machine.host_bytes - common) // own_host, 0)
    problem = None
    if batch < 1:
        held = f"sources {work.sources} x {gib(one)} + " if on_device else ""
        problem = (f"GPU memory: one worker needs {gib(fixed + seq)} on its GPU at batch 1 ({held}"
                   f"{_parts(work, one, scratch, seq)} + context {gib(GPU_CONTEXT)}); {per_gpu} worker(s) "
                   f"per GPU have {gib(share)} each: {gib(fixed + seq - share)} short (workers do not span GPUs)")
    elif common + work.workers * own_host > machine.host_bytes:
        cast = f" + sources cast to {work.dtype} {gib(sources)}" if own_host > built else ""
        problem = (f"host memory: {work.workers} GPU worker(s) need {gib(own_host)} each (the model built "
                   f"on the host {gib(one)} + process {gib(PROCESS)}{cast}){_beside(common)}; the machine "
                   f"has {gib(machine.host_bytes)}: {gib(common + work.workers * own_host - machine.host_bytes)}"
                   f" short (at most {most_host} worker(s) fit)")
    return Plan(shape, work, machine, one, placement, scratch, seq, batch, fixed + batch * seq, own_host, common,
                per_gpu, most_gpu, min(most_gpu * machine.gpus, most_host), problem)


def _parts(work: Workload, one: int, scratch: int, seq: int, sources: int = 0, shared: bool = True) -> str:
    cast = "" if shared else f" + sources cast to {work.dtype} {gib(sources)}"
    return (f"model {gib(one)} + merge scratch {gib(scratch)} + one sequence of {work.seq_len} tokens "
            f"{gib(seq)}{cast}")


def _beside(common: int) -> str:
    return f" beside {gib(common)} of sources shared in host memory" if common else ""


def gib(n: int | float) -> str:
    """Bytes in GiB with two decimals (MiB or KiB below one GiB)."""
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1024:.2f} KiB"
