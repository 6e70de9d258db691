"""Steps of benchmarks/gpu_check.sh: environment, merge kernels, models, reports, replay checks.

    python benchmarks/gpu_check.py env
    python benchmarks/gpu_check.py ops --device cuda [--rows 11008 --cols 4096] [--full-7b] [--budget S]
    python benchmarks/gpu_check.py build --out DIR --device cuda [--hidden 1024 --layers 16] [--trials 40 --trials1 16]
    python benchmarks/gpu_check.py report --db FILE --label L [--mem FILE] [--wall S] [--workers N]
    python benchmarks/gpu_check.py replay-check --db FILE --a DIR --b DIR [--trial N]
    python benchmarks/gpu_check.py host-sources --folder DIR
    python benchmarks/gpu_check.py summary --work DIR

``env`` prints what the check runs on (device, torch, Python, where evomerge is imported from,
the C compiler and Python headers that torch.compile and workers/kernels/native.py need).
``ops`` times every registered merge operator on one 7B-shaped MLP matrix (11008 x 4096, bf16)
x (base + 2 experts; slerp 1, swap reads 1) against ``dst.copy_(src)`` on the same device:
first call (compilation included) and the best of ``--repeats``, as a fraction of the copy's
bytes per second; ``--full-7b`` then merges a whole Llama-7B tensor set (3 x 13.5 GB on the
device) with a few operators. ``build`` makes, from nothing but this repository (no download),
a random Llama of about 200 M parameters with the demo's character tokenizer, two noisy
"experts" of it (bf16 safetensors), and two bf16 search configs on ``--device``:
``search2.yaml`` (2 workers sharing one GPU, ``workers.num_gpus: 0.5``) and ``search1.yaml``
(1 worker owning it). The models are random: the scores mean nothing; the check is that the
bf16 path runs and how fast. ``report`` prints seconds per candidate (materialize / evaluate,
from the database), failed trials and peak GPU memory (nvidia-smi samples, all processes).
``replay-check`` compares two replays of the best candidate bit for bit, each with the same
candidate materialized again in the check's process on the study's device by the workers' own
code (``Materializer``: same device, same bits), and on a GPU that merge with the CPU's (the
cross-device tolerance docs/merge-engine.md states: at most 1 unit in the last place). ``summary`` prints
the table of everything the steps recorded (``$GPU_CHECK_SUMMARY``, ``steps.tsv``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
# per-expert values (expert a, expert b) and shared values of the operators' parameters
PER_EXPERT = {"weight": (0.7, 0.5), "density": (0.5, 0.5), "gamma": (0.01, 0.01), "epsilon": (0.15, 0.15),
              "tall": (0.4, 0.4), "select": (0.8, 0.3)}
SHARED = {"scale": 1.0, "t": 0.5, "k": 1.0, "ratio": 0.1}
# the best merged candidate (not a source model: its replay would be a copy); the latest on ties
# (random models score alike: then a CMA-tuned DARE-TIES merge, random masks included)
BEST = ("select id, trial_number, fitness from evomerge_candidates where state = 'complete' and fitness is not null "
        "and duplicate_of is null and trial_number is not null and recipe_json like '%\"kind\":\"merge\"%' ")


def record(section: str, item: str, value: object) -> None:
    """One line for the final summary table (``$GPU_CHECK_SUMMARY``; nothing when unset)."""
    path = os.environ.get("GPU_CHECK_SUMMARY")
    if path:
        with open(path, "a") as f:
            f.write(f"{section}\t{item}\t{' '.join(str(value).split())}\n")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best(fn: Callable[[], Any], device: str, repeats: int) -> tuple[float, float]:
    """(first call's seconds, best of ``repeats`` more) with the device synchronized."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = best = time.perf_counter() - start
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return first, best


def env() -> None:
    import platform
    import sysconfig

    import torch

    import evomerge

    cuda = torch.cuda.is_available()
    device = f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)" \
        if cuda else f"cpu ({os.cpu_count()} cores)"
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("g++")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    try:
        import triton  # noqa: F401
        triton_v = triton.__version__
    except Exception:
        triton_v = "absent"
    rows = {"device": device, "torch": f"{torch.__version__} (cuda {torch.version.cuda})",
            "python": f"{platform.python_version()} {sys.executable}",
            "evomerge from": str(Path(evomerge.__file__).parent),
            "C compiler": cc or "none (torch.compile and workers/kernels/native.py fall back to eager/torch)",
            "Python.h": "yes" if header.is_file() else f"no ({header}; Triton's launcher needs it)",
            "triton": triton_v}
    for key, value in rows.items():
        print(f"{key}: {value}")
        record("env", key, value)


def _op_sources(rows: int, cols: int, device: str, dtype: Any, seed: int = 0) -> dict[str, Any]:
    """base ~ N(0, 0.02²), experts = base + 0.002·(shared + own noise), made on ``device``."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(rows, cols, generator=g, device=device).mul_(0.02)
    shared = torch.randn(rows, cols, generator=g, device=device).mul_(0.002)
    out = {"base": base.to(dtype)}
    for name in ("a", "b"):
        out[name] = torch.randn(rows, cols, generator=g, device=device).mul_(0.002).add_(shared).add_(base).to(dtype)
    return out


def _merge_fn(op: Any, src: Mapping[str, Any], out: Any, key: str) -> Callable[[], Any]:
    """One tensor merged the way a worker merges it (workers/materialize.py merge_tensor)."""
    import torch

    from evomerge.workers.mergekit import SHARED_METHODS
    from evomerge.workers.layout import tensor_seed

    experts = ["a"] if op.name == "slerp" else ["a", "b"]
    kwargs = {p.name: (PER_EXPERT[p.name][:len(experts)] if p.per_expert else SHARED[p.name]) for p in op.params}
    normalize = SHARED_METHODS.get(op.name, False)

    def run() -> Any:
        generator = torch.Generator().manual_seed(tensor_seed(1, key)) if op.random else None
        return op.fn(src["base"], [src[m] for m in experts], normalize=normalize, generator=generator, out=out,
                     **kwargs)
    return run


def _reads(op_name: str) -> int:
    return {"swap": 1, "linear": 2, "slerp": 2}.get(op_name, 3)


def ops(device: str, rows: int, cols: int, repeats: int, full_7b: bool, full_ops: list[str], budget: float) -> None:
    import torch

    from evomerge.workers.registry import OPERATORS

    start = time.monotonic()
    dtype = torch.bfloat16
    src = _op_sources(rows, cols, device, dtype)
    out = torch.empty_like(src["base"])
    numel, size = rows * cols, src["base"].element_size()
    _, copy_s = _best(lambda: out.copy_(src["base"]), device, max(repeats, 5))
    copy_bw = numel * size / copy_s
    print(f"ops on {device}: one {rows}x{cols} bf16 matrix x (base + 2 experts); copy_ {copy_bw / 1e9:.0f} GB/s read")
    record("ops", f"copy_ {rows}x{cols} bf16", f"{copy_s * 1e3:.3f} ms, {copy_bw / 1e9:.0f} GB/s")
    print(f"{'operator':<18}{'first s':>9}{'best ms':>10}{'GB/s':>8}{'frac':>7}{'peak MiB':>10}")
    failed = []
    for name, op in OPERATORS.items():
        if time.monotonic() - start > budget:
            print(f"{name:<18} skipped (ops budget {budget:.0f} s spent)")
            record("ops", name, "skipped (budget)")
            continue
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        try:
            first, best = _best(_merge_fn(op, src, out, "model.layers.0.mlp.up_proj.weight"), device, repeats)
        except Exception as exc:  # one operator failing must not hide the others
            failed.append(name)
            line = f"FAILED: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            print(f"{name:<18} {line}")
            record("ops", name, line)
            continue
        peak = (torch.cuda.max_memory_allocated() - held) / 2**20 if device.startswith("cuda") else float("nan")
        bw = _reads(name) * numel * size / best
        print(f"{name:<18}{first:>9.2f}{best * 1e3:>10.3f}{bw / 1e9:>8.0f}{bw / copy_bw:>7.2f}{peak:>10.0f}")
        record("ops", name, f"{best * 1e3:.3f} ms ({bw / copy_bw:.2f} of copy), first call {first:.1f} s"
               + ("" if peak != peak else f", +{peak:.0f} MiB"))
    del src, out
    if full_7b:
        left = budget - (time.monotonic() - start)
        if left < 30:
            print(f"full 7B set: skipped ({left:.0f} s of the ops budget left)")
            record("ops 7B", "full 7B layer set", "skipped (budget)")
        else:
            _full_7b(device, full_ops, repeats=1)
    if failed:
        sys.exit(f"ops: failed: {', '.join(failed)}")


def _full_7b(device: str, names: list[str], repeats: int) -> None:
    """Every tensor of a Llama-7B (hidden 4096, MLP 11008, 32 layers, vocab 32000) x 3 sources
    on the device, merged tensor by tensor into a preallocated output (what a worker does)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.workers.registry import OPERATORS

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                             num_hidden_layers=32, num_attention_heads=32))
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device=device).manual_seed(0)
    src: dict[str, dict[str, Any]] = {n: {} for n in ("base", "a", "b")}
    outs = {}
    for key, shape in shapes.items():
        base = torch.randn(shape, generator=g, device=device).mul_(0.02)
        for n in ("a", "b"):
            src[n][key] = torch.randn(shape, generator=g, device=device).mul_(0.002).add_(base).to(torch.bfloat16)
        src["base"][key] = base.to(torch.bfloat16)
        outs[key] = torch.empty(shape, dtype=torch.bfloat16, device=device)
        del base
    _sync(device)
    _, copy_s = _best(lambda: [outs[k].copy_(src["base"][k]) for k in shapes], device, 2)
    copy_bw = numel * 2 / copy_s
    print(f"full 7B layer set: {len(shapes)} tensors, {numel / 1e9:.2f} B parameters x 3 sources on {device} "
          f"(made in {time.perf_counter() - t0:.0f} s); copy_ of one model {copy_s * 1e3:.1f} ms "
          f"({copy_bw / 1e9:.0f} GB/s)")
    record("ops 7B", "copy_ one 7B model", f"{copy_s * 1e3:.1f} ms, {copy_bw / 1e9:.0f} GB/s")
    for name in names:
        op = OPERATORS[name]
        fns = [_merge_fn(op, {n: src[n][k] for n in src}, outs[k], k) for k in shapes]
        try:
            first, best = _best(lambda: [f() for f in fns], device, repeats)
        except Exception as exc:
            print(f"{name}: FAILED: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            record("ops 7B", name, f"FAILED: {type(exc).__name__}")
            continue
        ideal = _reads(name) * numel * 2 / copy_bw
        print(f"7B {name:<16} first {first:.2f} s, then {best * 1e3:.0f} ms per candidate "
              f"(copy-bound ideal {ideal * 1e3:.0f} ms: {ideal / best:.2f} of it)")
        record("ops 7B", name,
               f"{best * 1e3:.0f} ms per 7B candidate ({ideal / best:.2f} of copy bound), first {first:.1f} s")
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"full 7B set: peak GPU memory allocated {peak:.1f} GiB")
        record("ops 7B", "peak GPU memory (torch)", f"{peak:.1f} GiB")


def build(out: Path, hidden: int, layers: int, trials: int, trials1: int, device: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "models" / "base")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    for name, noise in (("base", 0.0), ("a", 0.01), ("b", 0.01)):
        state = {k: v + noise * torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in base.state_dict().items()}
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.load_state_dict(state)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    shutil.copytree(DEMO / "tasks", out / "tasks")
    params = sum(p.numel() for p in base.parameters())
    gpu = device.startswith("cuda")
    for file, count, share, budget in (("search2.yaml", 2, 0.5, trials), ("search1.yaml", 1, 1.0, trials1)):
        (out / file).write_text(f"""\
# benchmarks/gpu_check.sh: {params / 1e6:.0f} M-parameter random Llamas in bf16 on {device},
# {count} worker(s){' sharing one GPU' if gpu and count > 1 else ' owning the GPU' if gpu else ''}
study: gpu_check_{count}w
models:
  - {{name: base, path: base}}
  - {{name: a, path: a}}
  - {{name: b, path: b}}
base_model: base
merge: {{method: dare_ties, seed: 0}}
optimizer: {{name: cma, seed: 0}}
evaluation:
  task_paths: [tasks]
  tasks: [{{name: cipher_a}}, {{name: cipher_b}}, {{name: cipher_mix}}]
  search_split: search
  heldout_split: heldout
  heldout_top_k: 2
  batch_size: 200
budget: {{max_trials: {budget}}}
workers: {{count: {count}, num_gpus: {share if gpu else 0}, dtype: bfloat16}}
""")
    print(f"built {out}: 3 x {params / 1e6:.1f} M parameters (bf16), search2.yaml ({trials} trials, 2 workers), "
          f"search1.yaml ({trials1} trials, 1 worker) on {device}")
    record("models", "built", f"3 x {params / 1e6:.1f} M parameters bf16 (hidden {hidden}, {layers} layers)")


def report(db: Path, label: str, mem: Path | None, wall: float | None, workers: int) -> None:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select state, materialize_s, evaluate_s, worker from evomerge_candidates").fetchall()
    done = [r for r in rows if r[0] == "complete" and r[1] is not None]
    failed = sum(1 for r in rows if r[0] == "failed")
    line = f"{len(rows)} candidates, {len(done)} complete, {failed} failed, {len({r[3] for r in done})} worker(s)"
    print(f"{label}: {line}")
    record(label, "candidates", line)
    if done:
        mat, ev = [r[1] for r in done], [r[2] for r in done]
        line = f"materialize {statistics.median(mat):.3f} s, evaluate {statistics.median(ev):.3f} s (median)"
        print(f"{label}: seconds per candidate: {line}")
        record(label, "per candidate", line)
    if wall and rows:
        line = (f"{wall:.0f} s wall (Ray start included): {wall / len(rows):.2f} s per candidate "
                f"with {workers} worker(s)")
        print(f"{label}: {line}")
        record(label, "search wall", line)
    if mem is not None and mem.is_file():
        used = [int(x) for x in mem.read_text().split() if x.strip().isdigit()]
        line = f"{max(used, default=0)} MiB (nvidia-smi, all processes)"
    else:
        line = "n/a (no nvidia-smi samples)"
    print(f"{label}: peak GPU memory used: {line}")
    record(label, "peak GPU memory", line)


def _folder_tensors(folder: Path) -> dict[str, Any]:
    from safetensors import safe_open

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _materialized(db: Path, candidate: int, device: str) -> dict[str, Any]:
    """The candidate's weights as a worker's Materializer builds them on ``device`` (the code the
    search ran, in this process), by parameter name."""
    import torch

    from evomerge.search.config import stored_config
    from evomerge.workers.materialize import Materializer
    from evomerge.workers.recipe import parse_recipe
    from evomerge.workers.sources import validate_sources

    with sqlite3.connect(db) as conn:
        recipe_json, study = conn.execute(
            "select c.recipe_json, s.name from evomerge_candidates c join evomerge_studies s on s.id = c.study_id "
            "where c.id = ?", (candidate,)).fetchone()
        (config_json,) = conn.execute("select config_json from evomerge_studies where name = ?", (study,)).fetchone()
    cfg = stored_config(config_json, study)
    folders = validate_sources(cfg.sources(), False, cfg.base_model)
    materializer = Materializer(folders, cfg.base_model, getattr(torch, cfg.workers.dtype), device=device)
    materializer.apply(parse_recipe(recipe_json))
    return {k: p.detach() for k, p in materializer.params.items()}


def _ulps(a: Any, b: Any) -> tuple[int, int]:
    """(entries that differ, largest difference in units in the last place) of two tensors of one
    float dtype (same-sign values: the bit patterns' distance)."""
    import torch

    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    x, y = a.contiguous().view(ints).to(torch.int64), b.contiguous().view(ints).to(torch.int64)
    diff = (x - y).abs()
    return int((diff != 0).sum()), int(diff.max()) if diff.numel() else 0


def replay_check(db: Path, a: Path, b: Path, trial: int | None) -> None:
    """Two replays equal bit for bit; each equal to the candidate materialized again here on the
    study's device by the worker's code (same device, same bits); on a GPU, the same
    materialized on the CPU: how far another device's replay is (units in the last place)."""
    import torch

    ta, tb = _folder_tensors(a), _folder_tensors(b)
    same = ta.keys() == tb.keys() and all(_ulps(ta[k], tb[k])[0] == 0 and ta[k].dtype == tb[k].dtype for k in ta)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in ta.values()})
    line = f"{'bit-identical' if same else 'DIFFER'} ({len(ta)} tensors, {'/'.join(dtypes)})"
    print(f"replay twice: {line}")
    record("replay", "replay twice", line)
    ok = same
    with sqlite3.connect(db) as conn:
        where = "and trial_number = ? " if trial is not None else ""
        row = conn.execute(BEST + where + "order by fitness desc, id desc limit 1",
                           () if trial is None else (trial,)).fetchone()
    if row is None:
        sys.exit("replay-check: no complete merged candidate")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    here = _materialized(db, int(row[0]), device)
    keys = [k for k in ta if k in here]
    bad = [k for k in keys if _ulps(ta[k], here[k].cpu())[0]]
    ok = ok and not bad and bool(keys)
    line = (f"{'bit-identical' if not bad else 'DIFFER'} to trial {row[1]} materialized again on {device} "
            f"({len(keys)} tensors" + (f", {len(bad)} differ, e.g. {bad[0]}" if bad else "") + ")")
    print(f"replay vs search: {line}")
    record("replay", f"replay vs materialized on {device}", line)
    if device != "cpu":  # the cross-device tolerance docs/merge-engine.md states: within 1 ulp
        cpu = _materialized(db, int(row[0]), "cpu")
        counts = [_ulps(here[k].cpu(), cpu[k]) for k in keys]
        entries, worst = sum(c[0] for c in counts), max((c[1] for c in counts), default=0)
        total = sum(here[k].numel() for k in keys)
        line = f"{entries} of {total} entries differ, at most {worst} ulp"
        print(f"cuda vs cpu merge: {line}")
        record("replay", "cuda vs cpu merge", line)
        ok = ok and worst <= 1
    if not ok:
        sys.exit("replay-check: FAILED")


def best_trial(db: Path) -> None:
    """Print the trial number of the best merged candidate (what replay-check compares)."""
    with sqlite3.connect(db) as conn:
        row = conn.execute(BEST + "order by fitness desc, id desc limit 1").fetchone()
    if row is None:
        sys.exit("best-trial: no complete merged candidate")
    print(row[1])


def host_sources(folder: Path) -> None:
    """One DARE-TIES merge on cuda with the sources on the GPU and with them in host memory,
    streamed per tensor (workers.sources: host): equal results, and the GPU memory each took."""
    import torch

    from evomerge.workers.materialize import Materializer
    from evomerge.workers.recipe import MergeRecipe

    names = ("base", "a", "b")  # as build() writes them
    base, experts = names[0], names[1:]
    recipe = MergeRecipe(method="dare_ties", base=base, models=experts, seed=1,
                    params={"weight": {m: (0.8,) for m in experts}, "density": {m: (0.5,) for m in experts}})
    merged = {}
    for where in ("device", "host"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        mat = Materializer({n: folder / n for n in names}, base, torch.bfloat16, "cuda", sources=where)
        start = time.perf_counter()
        mat.apply(recipe)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        merged[where] = {k: p.detach().clone() for k, p in mat.params.items()}
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"sources on {where}: merge {seconds:.2f} s, peak GPU memory {peak:.2f} GiB")
        record("host sources", f"sources on {where}", f"merge {seconds:.2f} s, peak {peak:.2f} GiB")
        del mat
    same = all(torch.equal(merged["device"][k], merged["host"][k]) for k in merged["device"])
    print(f"host-streamed merge equals the on-device merge: {same}")
    record("host sources", "host-streamed = on-device", same)
    if not same:
        sys.exit("host-sources: the merges differ")


def summary(work: Path, mode: str) -> None:
    """The final table: every step's status and seconds, then what the steps recorded."""
    steps = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines()] \
        if (work / "steps.tsv").is_file() else []
    lines = [line.split("\t", 2) for line in (work / "summary.tsv").read_text().splitlines()] \
        if (work / "summary.tsv").is_file() else []
    width = 100
    print("=" * width)
    print(f"gpu_check summary ({mode} mode, {work})")
    print("-" * width)
    print(f"{'step':<22}{'status':<36}{'seconds':>8}")
    total = 0.0
    for name, status, seconds in steps:
        total += float(seconds)
        print(f"{name:<22}{status:<36}{float(seconds):>8.0f}")
    print(f"{'total':<22}{'':<36}{total:>8.0f}")
    print("-" * width)
    section = None
    for sec, item, value in lines:
        if sec != section:
            print(f"[{sec}]")
            section = sec
        print(f"  {item:<30} {value}")
    print("=" * width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    o = sub.add_parser("ops")
    o.add_argument("--device", default="cuda")
    o.add_argument("--rows", type=int, default=11008)
    o.add_argument("--cols", type=int, default=4096)
    o.add_argument("--repeats", type=int, default=10)
    o.add_argument("--full-7b", action="store_true")
    o.add_argument("--full-ops", default="dare_ties,ties,task_arithmetic,linear")
    o.add_argument("--budget", type=float, default=150.0, help="seconds for this step (the rest is skipped)")
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--device", default="cuda")
    b.add_argument("--hidden", type=int, default=1024)
    b.add_argument("--layers", type=int, default=16)
    b.add_argument("--trials", type=int, default=40)
    b.add_argument("--trials1", type=int, default=16)
    r = sub.add_parser("report")
    r.add_argument("--db", type=Path, required=True)
    r.add_argument("--label", default="search")
    r.add_argument("--mem", type=Path)
    r.add_argument("--wall", type=float)
    r.add_argument("--workers", type=int, default=2)
    c = sub.add_parser("replay-check")
    c.add_argument("--db", type=Path, required=True)
    c.add_argument("--a", type=Path, required=True)
    c.add_argument("--b", type=Path, required=True)
    c.add_argument("--trial", type=int)
    t = sub.add_parser("best-trial")
    t.add_argument("--db", type=Path, required=True)
    h = sub.add_parser("host-sources")
    h.add_argument("--folder", type=Path, required=True)
    s = sub.add_parser("summary")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--mode", default="gpu")
    args = parser.parse_args()
    if args.cmd == "env":
        env()
    elif args.cmd == "ops":
        ops(args.device, args.rows, args.cols, args.repeats, args.full_7b, args.full_ops.split(","), args.budget)
    elif args.cmd == "build":
        build(args.out, args.hidden, args.layers, args.trials, args.trials1, args.device)
    elif args.cmd == "report":
        report(args.db, args.label, args.mem, args.wall, args.workers)
    elif args.cmd == "replay-check":
        replay_check(args.db, args.a, args.b, args.trial)
    elif args.cmd == "best-trial":
        best_trial(args.db)
    elif args.cmd == "host-sources":
        host_sources(args.folder)
    else:
        summary(args.work, args.mode)


if __name__ == "__main__":
    main()
