"""``evomerge plan`` and the memory check that starts ``evomerge search``: the search config
and this machine (or the one described by ``--gpus``, ``--gpu-memory``, ``--host-memory``)
turned into a :class:`~evomerge.workers.memory_plan.Plan`, printed as a table or JSON, or
refused in one line (exit 2) before Ray starts or anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys

from evomerge.search.config import SearchConfig, load_config
from evomerge.search.families import families
from evomerge.workers.kernels.band_cuts import CUT_ROW_BYTES
from evomerge.workers.memory_plan import (DEFAULT_MAX_LENGTH, GiB, Machine, Plan,
                                          PlanError, Workload, gib, plan, read_shape)
from evomerge.workers.sources import validate_sources


def host_memory() -> int:
    """This machine's total memory in bytes (/proc/meminfo, else sysconf)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_gpus() -> list[int]:
    """Total memory of each GPU of this machine in bytes, from nvidia-smi (no CUDA context is
    created in this process); empty without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return [int(float(line)) << 20 for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def plan_search(cfg: SearchConfig, machine: Machine, workers: int | None = None, max_length: int | None = None,
                allow_pickle: bool = False) -> Plan:
    """The memory plan of ``cfg`` on ``machine`` from the sources' headers (SourceError when a
    source is unusable); ``workers`` and ``max_length`` override the config's and the default."""
    folders = validate_sources(cfg.sources(), allow_pickle, cfg.base_model)
    shape = read_shape(cfg.base_model, folders[cfg.base_model], allow_pickle)
    seq_len = max_length or min(shape.max_length, DEFAULT_MAX_LENGTH)
    merges = families(cfg.merge.method, len(folders) - 1, cfg.merge.transforms) if "ps" in cfg.space else ()
    work = Workload(len(folders), cfg.workers.dtype, workers or cfg.workers.count, cfg.evaluation.batch_size,
                    seq_len, cfg.workers.sources, merges)
    return plan(shape, work, machine)


def check_search(cfg: SearchConfig, workers: int, ray_address: str | None, allow_pickle: bool = False) -> Plan | None:
    """The plan at the start of a search on this machine: PlanError when it cannot fit, one
    line on stderr for GPU workers. Skipped (None) when joining a cluster (its nodes are not
    this one), when GPU workers are asked for and no GPU is seen here, or (one warning line) when
    the sources' config lacks a size the plan needs."""
    if ray_address:
        return None
    gpus = local_gpus() if cfg.workers.num_gpus > 0 else []
    if cfg.workers.num_gpus > 0 and not gpus:
        return None
    try:
        result = plan_search(cfg, Machine(host_memory(), len(gpus), min(gpus, default=0)), workers,
                             allow_pickle=allow_pickle)
    except PlanError as exc:  # an architecture the plan cannot read: search as before, said once
        print(f"evomerge: warning: {exc}", file=sys.stderr)
        return None
    if result.problem:
        raise PlanError(result.problem)
    if gpus:
        print(f"memory plan: sources on {result.placement}, batch {result.batch}, "
              f"{gib(result.worker_gpu_bytes)} of GPU per worker", file=sys.stderr)
    return result


def _scratch_rule(result: Plan) -> str:
    """Which rule sized the merge scratch: the float32 merge, or the device cuts of trimming methods."""
    if not result.scratch_cuts:
        return f"in float32 x {result.workload.sources + 1}"
    return f"TIES/Breadcrumbs cuts on the device: {result.scratch_cuts} per graph x {CUT_ROW_BYTES} B/entry"


def render(result: Plan) -> str:
    """The plan as a small aligned table."""
    shape, work, machine = result.shape, result.workload, result.machine
    where = {"device": "device: on each worker's GPU",
             "host": "host memory, streamed to the GPU per tensor" if machine.gpus else "host memory",
             "disk": "memory-mapped from disk, read again per candidate"}[result.placement]
    if result.placement == "host" and not result.shared_host_bytes:
        where += f" (cast to {work.dtype}: a copy per worker)"
    rows = [
        ("sources", f"{work.sources} x {_count(shape.params)} parameters, files "
                    f"{'/'.join(shape.file_dtypes)} {gib(shape.file_bytes)} each; workers {work.dtype}"),
        ("machine", (f"{machine.gpus} GPU(s) x {gib(machine.gpu_bytes)}, " if machine.gpus else "CPU workers, ")
         + f"host {gib(machine.host_bytes)}"),
        ("bytes per source", f"{gib(result.source_bytes)} ({gib(work.sources * result.source_bytes)} for all)"),
        ("sources live in", where),
        ("merge scratch", f"{gib(result.scratch_bytes)} ({shape.largest} "
                          f"{'x'.join(map(str, shape.largest_shape))} {_scratch_rule(result)})"),
        ("one sequence", f"{gib(result.sequence_bytes)} ({work.seq_len} tokens; model max {shape.max_length})"),
        ("evaluation batch", f"{result.batch} (evaluation.batch_size {work.batch_size})"),
    ]
    if machine.gpus:
        rows += [("GPU per worker", gib(result.worker_gpu_bytes)),
                 ("workers per GPU", f"{result.workers_per_gpu} (up to {result.max_workers_per_gpu} fit at batch 1)")]
    shared = f" + {gib(result.shared_host_bytes)} shared by the node" if result.shared_host_bytes else ""
    rows += [("host per worker", gib(result.worker_host_bytes) + shared),
             ("workers per node", f"{work.workers} (up to {result.max_workers_per_node} fit at batch 1)")]
    if result.problem:
        rows.append(("does not fit", result.problem))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def cmd_plan(args: argparse.Namespace, _url: str | None) -> int:
    cfg = load_config(args.config)
    gpus = args.gpus or 0
    gpu_bytes = int(args.gpu_memory * GiB) if args.gpu_memory else min(local_gpus() if gpus else [], default=0)
    if gpus and not gpu_bytes:
        raise PlanError("--gpus: no GPU seen here to measure; give --gpu-memory GiB")
    host = int(args.host_memory * GiB) if args.host_memory else host_memory()
    result = plan_search(cfg, Machine(host, gpus, gpu_bytes), args.workers, args.max_length, args.allow_pickle)
    if result.problem:
        raise PlanError(result.problem)
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else render(result))
    return 0


def _count(n: int) -> str:
    return next((f"{n / scale:.3g} {unit}" for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)) if n >= scale),
                str(n))
