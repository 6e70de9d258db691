"""Merge throughput: evomerge's Materializer.apply against memory bandwidth and mergekit, per operator.

Builds (once, cached in --workdir) three random-weight Llama models, float32, tied embeddings:
a base and two experts = base + small random task vectors (10 % of the weights' scale, partly
shared between the experts). ``--size 100m``: hidden 768, 12 layers, MLP 2048, vocab 32000
(~110 M parameters, 0.44 GB per model); ``--size small``: ~11 M. The tokenizer is the demo's
(20 tokens) with ``vocab_size`` 32000 in the config: loadable, rows beyond the tokenizer unused.

Measured in one run, 2 threads (torch.set_num_threads(2)), best of --repeats after a warm-up
(one timed run only when the warm-up takes over 15 s, none over 40 s). The load average is
printed: other processes on the machine make 2-thread OpenMP timings erratic.

- copy: ``dst.copy_(src)`` on a float32 tensor of one model's size; bytes read per second.
- ours: ``Materializer.apply(recipe)`` for every registered operator (sources already in memory),
  in bytes of source tensors read per second: for each parameter, the sizes of the tensors the
  operator reads (base + experts; linear reads only the experts, swap only the chosen model).
- mergekit: ``merge_state_dicts`` (mergekit's in-memory API; state dicts already in memory) of the
  same merge, its parameters parsed from ``workers.mergekit.to_mergekit``'s YAML. Where the
  in-memory path fails, ``run_merge`` to disk (loading included) is timed instead, marked "disk".
  ``max|d|`` is the largest difference between the two merged models (random methods: n/a).
- replay of one model to disk (--disk-op): our ``write_model_folder`` (apply, save, fsync, reload
  and verify), its parts, and mergekit's ``run_merge`` and ``mergekit-yaml`` CLI on the same config.

    python benchmarks/merge_throughput.py [--size small|100m] [--repeats 3] [--ops ties,slerp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from evomerge.workers.mergekit import SHARED_METHODS, to_mergekit  # noqa: E402
from evomerge.workers.materialize import Materializer  # noqa: E402
from evomerge.workers.registry import OPERATORS  # noqa: E402
from evomerge.workers.recipe import MergeRecipe, Recipe
from evomerge.workers.replay import verify_folder, write_model_folder  # noqa: E402

SIZES = {"small": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, num_attention_heads=4),
         "100m": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12)}
NAMES = ("base", "expert_a", "expert_b")
EXPERTS = NAMES[1:]
# Per-expert values (expert_a, expert_b) and shared values of each operator's parameters.
PER_EXPERT = {"weight": (0.7, 0.5), "density": (0.5, 0.5), "gamma": (0.01, 0.01), "epsilon": (0.15, 0.15),
              "tall": (0.4, 0.4), "select": (0.8, 0.3)}
SHARED = {"scale": 1.0, "t": 0.5, "k": 1.0, "ratio": 0.1}
SLOW_S = 15.0  # warm-up longer than this: one timed run only
VERY_SLOW_S = 40.0  # warm-up longer than this: the warm-up is the measurement


def build_models(workdir: Path, size: str) -> dict[str, Path]:
    """The three model folders, built once per size."""
    root = workdir / size
    folders = {n: root / n for n in NAMES}
    if (root / "done").is_file():
        return folders
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=512, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None, rms_norm_eps=1e-6, **SIZES[size])
    model = LlamaForCausalLM(cfg).eval()
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    shared = {k: torch.randn_like(v) for k, v in base.items()}
    for name in NAMES:
        with torch.no_grad():
            for key, param in model.named_parameters():
                scale = 0.1 * float(base[key].std()) if base[key].numel() > 1 and float(base[key].std()) > 0 else 0.01
                delta = 0 if name == "base" else scale * (0.5 * shared[key] + torch.randn_like(param))
                param.copy_(base[key] + delta)
        model.save_pretrained(folders[name])
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(ROOT / "demo" / "models" / "base" / file, folders[name] / file)
    (root / "done").write_text("ok\n")
    return folders


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall seconds of ``repeats`` calls after a warm-up (one call if the warm-up is slow)."""
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    if warm > VERY_SLOW_S:
        return warm
    times = []
    for _ in range(1 if warm > SLOW_S else repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(numel: int, repeats: int) -> float:
    """Bytes read per second by dst.copy_(src), float32, ``numel`` elements."""
    src, dst = torch.randn(numel), torch.empty(numel)
    return src.nbytes / best_of(lambda: dst.copy_(src), max(repeats, 5))


def make_recipe(op: str) -> Recipe:
    spec = OPERATORS[op]
    models = EXPERTS[:1] if op == "slerp" else EXPERTS
    params = {p.name: {m: (PER_EXPERT[p.name][i],) for i, m in enumerate(models)} for p in spec.params
              if p.per_expert}
    shared = {p.name: (SHARED[p.name],) for p in spec.params if not p.per_expert}
    return MergeRecipe(method=op, base="base", models=models, params=params, shared=shared,
                  normalize=SHARED_METHODS.get(op, False), seed=1, label="bench")


def bytes_read(mat: Materializer, recipe: Recipe) -> int:
    """Source bytes the recipe reads: base + experts per parameter (linear: experts, swap: one)."""
    per_model = sum(p.numel() * p.element_size() for p in mat.params.values())
    if recipe.method == "swap":
        return per_model
    return per_model * (len(recipe.models) + (recipe.method != "linear"))


def mergekit_call(recipe: Recipe, folders: dict[str, Path]) -> tuple[list[str], str | None, dict[str, Any], str]:
    """merge_state_dicts arguments (model ids, base, parameters) parsed from to_mergekit's YAML."""
    text = to_mergekit(recipe, {n: str(f) for n, f in folders.items()})
    cfg = yaml.safe_load(text)
    by_path = {str(f): n for n, f in folders.items()}
    ids = [by_path[e["model"]] for e in cfg["models"]]
    base = by_path[cfg["base_model"]] if "base_model" in cfg else None
    if base is not None and base not in ids:
        ids.insert(0, base)
    params: dict[str, Any] = dict(cfg.get("parameters") or {})
    for entry in cfg["models"]:
        for key, value in (entry.get("parameters") or {}).items():
            params.setdefault(key, {})[by_path[entry["model"]]] = value
    return ids, base, params, text


def run_merge_disk(text: str, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    shutil.rmtree(out, ignore_errors=True)
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=True, random_seed=0, quiet=True))


def bench_ops(mat: Materializer, folders: dict[str, Path], ops: list[str], repeats: int,
              workdir: Path) -> list[tuple[str, float, float | None, str, float | None]]:
    """Per operator: bytes read, our seconds, mergekit seconds, mergekit path, max |ours − mergekit|."""
    from mergekit.merge_methods import merge_state_dicts

    sds = {n: load_file(str(f / "model.safetensors")) for n, f in folders.items()}
    rows = []
    for op in ops:
        recipe = make_recipe(op)
        ours = best_of(lambda: mat.apply(recipe), repeats)
        nbytes = bytes_read(mat, recipe)
        mk_s, path, diff = None, "-", None
        if op in SHARED_METHODS:
            ids, base, params, text = mergekit_call(recipe, folders)
            inputs = {i: sds[i] for i in ids}

            last: list[dict[str, torch.Tensor]] = []

            def merge() -> None:
                torch.manual_seed(0)
                with torch.no_grad():
                    last[:] = [merge_state_dicts(inputs, op, base=base, parameters=params)]

            try:
                mk_s, path = best_of(merge, repeats), "memory"
                if not OPERATORS[op].random:  # the working model still holds our merge
                    diff = max(float((mat.params[k].detach() - v).abs().max()) for k, v in last[0].items()
                               if k in mat.params)
                last.clear()
            except Exception as exc:  # fall back to mergekit's disk path, labelled
                print(f"  mergekit in-memory {op} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                mk_s, path = best_of(lambda: run_merge_disk(text, workdir / "mk_fallback"), repeats), "disk"
        rows.append((op, nbytes, ours, mk_s, path, diff))
        mk = f"{mk_s:.3f} s ({path})" if mk_s is not None else "-"
        print(f"  {op:17s} ours {ours:.3f} s   mergekit {mk}", flush=True)
    return rows


def bench_replay(mat: Materializer, folders: dict[str, Path], op: str, workdir: Path) -> list[tuple[str, float]]:
    """Seconds to write one merged model to disk, ours (total and parts) and mergekit's."""
    recipe = make_recipe(op)
    text = to_mergekit(recipe, {n: str(f) for n, f in folders.items()})
    out = workdir / "replay"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "mk.yaml").write_text(text)
    mat.apply(recipe)  # warm
    start = time.perf_counter()
    write_model_folder(mat, recipe, out / "ours", card="# bench\n")
    total = time.perf_counter() - start
    start = time.perf_counter()
    mat.apply(recipe)
    apply_s = time.perf_counter() - start
    start = time.perf_counter()
    verify_folder(mat.model, out / "ours")
    verify_s = time.perf_counter() - start
    start = time.perf_counter()
    run_merge_disk(text, out / "mk_api")
    api_s = time.perf_counter() - start
    cli = Path(sys.executable).parent / "mergekit-yaml"
    start = time.perf_counter()
    subprocess.run([str(cli), str(out / "mk.yaml"), str(out / "mk_cli"), "--copy-tokenizer", "--random-seed", "0",
                    "--quiet"], check=True, capture_output=True)
    cli_s = time.perf_counter() - start
    return [("ours write_model_folder (apply+save+fsync+verify)", total),
            ("  of which apply", apply_s), ("  of which verify (reload + compare)", verify_s),
            ("  of which save+fsync (rest)", total - apply_s - verify_s),
            ("ours without verify", total - verify_s),
            ("mergekit run_merge (in process, loads page-cached files)", api_s),
            ("mergekit-yaml CLI (subprocess: interpreter + imports too)", cli_s)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="100m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", default="", help="comma-separated subset of operators (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-bench"))
    parser.add_argument("--disk-op", default="ties", help="operator of the replay-to-disk comparison")
    parser.add_argument("--no-disk", action="store_true", help="skip the replay-to-disk comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ops = [o for o in args.ops.split(",") if o] or list(OPERATORS)
    unknown = [o for o in ops if o not in OPERATORS]
    if unknown:
        parser.error(f"unknown operator(s) {unknown} (known: {', '.join(OPERATORS)})")

    start = time.perf_counter()
    folders = build_models(args.workdir, args.size)
    print(f"load average at start {os.getloadavg()[0]:.2f} (2 cores)")
    print(f"models ready in {time.perf_counter() - start:.1f} s: {args.workdir / args.size}")
    mat = Materializer(folders, "base")
    numel = sum(p.numel() for p in mat.params.values())
    copy = copy_bandwidth(numel, args.repeats)
    print(f"{args.size}: {numel / 1e6:.1f} M parameters/model ({numel * 4 / 1e9:.2f} GB fp32), "
          f"{torch.get_num_threads()} threads; copy bandwidth {copy / 1e9:.2f} GB/s read", flush=True)

    rows = bench_ops(mat, folders, ops, args.repeats, args.workdir)
    print(f"\n{'operator':17s} | {'ours GB/s':>9s} | {'ours/copy':>9s} | {'mergekit GB/s':>13s} | "
          f"{'ours/mergekit':>13s} | {'ours s':>7s} | {'mergekit s':>10s} | {'max|d|':>7s}")
    print("-" * 104)
    for op, nbytes, ours, mk_s, path, diff in rows:
        mk_gbs = f"{nbytes / mk_s / 1e9:8.3f}" + (" disk" if path == "disk" else "     ") if mk_s else "-"
        ratio = f"{mk_s / ours:12.2f}x" if mk_s else f"{'-':>13s}"
        d = f"{diff:7.1e}" if diff is not None else ("    n/a" if mk_s else "      -")
        print(f"{op:17s} | {nbytes / ours / 1e9:9.3f} | {nbytes / ours / copy:9.3f} | {mk_gbs[:13]:>13s} | "
              f"{ratio} | {ours:7.3f} | {mk_s if mk_s else float('nan'):10.3f} | {d}")
    print(f"copy bandwidth {copy / 1e9:.2f} GB/s; ours/mergekit = speed ratio (mergekit s / ours s); "
          "GB/s = source bytes read per second")

    if not args.no_disk:
        print(f"\nreplay of one {args.size} model to disk ({args.disk_op}):")
        for label, seconds in bench_replay(mat, folders, args.disk_op, args.workdir):
            print(f"  {label:60s} {seconds:7.2f} s")
    print(f"total wall {time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
