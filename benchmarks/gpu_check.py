"""Helpers of benchmarks/gpu_check.sh: build its models on the machine, and report a search.

    python benchmarks/gpu_check.py build --out DIR [--hidden 1024 --layers 16]
    python benchmarks/gpu_check.py report --db FILE [--mem FILE] [--wall S]

``build`` makes, from nothing but this repository (no download), a random Llama of about
200 M parameters with the demo's character tokenizer, two noisy "experts" of it (bf16
safetensors), and a bf16 search config on cuda: 2 workers sharing one GPU
(``workers.num_gpus: 0.5``), the demo's tasks. The models are random: the scores mean
nothing; the check is that the cuda/bf16 path runs and how fast.
``report`` prints seconds per candidate (materialize / evaluate, from the database),
failed trials, and the peak GPU memory sampled by nvidia-smi.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"


def build(out: Path, hidden: int, layers: int, trials: int) -> None:
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
    (out / "search.yaml").write_text(f"""\
# benchmarks/gpu_check.sh: {params / 1e6:.0f} M-parameter random Llamas in bf16 on cuda
study: gpu_check
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
budget: {{max_trials: {trials}}}
workers: {{count: 2, num_gpus: 0.5, dtype: bfloat16}}
""")
    print(f"built {out}: 3 x {params / 1e6:.0f} M parameters (bf16), search.yaml")


def report(db: Path, mem: Path | None, wall: float | None) -> None:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select state, materialize_s, evaluate_s, worker from evomerge_candidates").fetchall()
    done = [r for r in rows if r[0] == "complete" and r[1] is not None]
    failed = sum(1 for r in rows if r[0] == "failed")
    print(f"candidates: {len(rows)}, complete {len(done)}, failed {failed}, workers {len({r[3] for r in done})}")
    if done:
        mat, ev = [r[1] for r in done], [r[2] for r in done]
        print(f"seconds per candidate (median): materialize {statistics.median(mat):.3f}, "
              f"evaluate {statistics.median(ev):.3f}")
    if wall and done:
        print(f"search wall time {wall:.0f} s: {wall / len(rows):.2f} s per candidate with 2 workers on one GPU")
    if mem is not None and mem.is_file():
        used = [int(x) for x in mem.read_text().split() if x.strip().isdigit()]
        print(f"peak GPU memory used (nvidia-smi, all processes): {max(used, default=0)} MiB")
    else:
        print("peak GPU memory: n/a (no nvidia-smi samples)")


def host_sources(folder: Path) -> None:
    """One DARE-TIES merge on cuda with the sources on the GPU and with them in host memory,
    streamed per tensor (workers.sources: host): equal results, and the GPU memory each took."""
    import time

    import torch

    from evomerge.workers.materialize import Materializer
    from evomerge.workers.recipe import Recipe

    names = ("base", "a", "b")  # as build() writes them
    base, experts = names[0], names[1:]
    recipe = Recipe(kind="merge", method="dare_ties", base=base, models=experts, seed=1,
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
        print(f"sources on {where}: merge {seconds:.2f} s, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        del mat
    same = all(torch.equal(merged["device"][k], merged["host"][k]) for k in merged["device"])
    print(f"host-streamed merge equals the on-device merge: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--hidden", type=int, default=1024)
    b.add_argument("--layers", type=int, default=16)
    b.add_argument("--trials", type=int, default=40)
    r = sub.add_parser("report")
    r.add_argument("--db", type=Path, required=True)
    r.add_argument("--mem", type=Path)
    r.add_argument("--wall", type=float)
    h = sub.add_parser("host-sources")
    h.add_argument("--folder", type=Path, required=True)
    args = parser.parse_args()
    if args.cmd == "build":
        build(args.out, args.hidden, args.layers, args.trials)
    elif args.cmd == "host-sources":
        host_sources(args.folder)
    else:
        report(args.db, args.mem, args.wall)


if __name__ == "__main__":
    main()
