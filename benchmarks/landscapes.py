"""Merge landscapes for the search-quality benchmark, built reproducibly from the demo's parts.

    python benchmarks/landscapes.py [--grid] [--families] [--only NAME,...]

builds what is missing; ``--grid`` prints a task-arithmetic grid per landscape, ``--families``
each merge family's best held-out over a grid of its own parameters (benchmarks/family_grid.py).

- ``demo``: the built-in demo as shipped (demo/demo.yaml's models and tasks).
- ``unseen``: two experts the defaults were never tuned on: other alphabets (even / odd
  letters), other ciphers, lighter experts (fewer, smaller steps), so their skills only show
  when the task vectors are amplified: averaging (0.5, 0.5) scores below both experts and the
  untuned start has no slope toward combining them.
- ``distractor``: the demo plus a third expert trained on an irrelevant skill (writing the
  word backwards), Sakana's distraction ablation: a good merge has to leave it out.
- ``narrow``: built so that no baseline passes and the success region is a small part of the
  default box: ``unseen``'s experts rescaled along their task vectors (cipher_a to half
  strength, so it needs amplifying; cipher_b overshot 1.6x, so it needs damping) plus a
  ``reverse`` distractor trained from ``unseen``'s base, which must be left out.
- ``layered``: per-layer structure on the demo's base: cipher_a's skill is trained into the
  lower half of the layers only and cipher_b's into the upper half only, and each expert's
  other half learns a *wrong* cipher for the other alphabet, so one weight per model cannot
  take one expert's good half without its harmful one.
- ``rescaled``: where DARE-TIES (the default family) loses to task arithmetic because dropping,
  trimming and sign election break the experts apart. The demo's experts in other weights:
  every MLP channel (up row x c, down column / c), value channel (v row x c, o column / c) and
  rotary query/key pair (q rows x c, k rows / c) of cipher_a rescaled by c, log-uniform in
  [1/2, 2], and cipher_b's by 1/c. Each expert computes exactly what it did, but its task
  vector is now dense and large (every entry of those matrices moves by (c - 1) x its value),
  and it means nothing unless whole: DARE's drop and TIES's trim unpair a channel's two sides
  within an expert, the sign election takes one expert's input side with the other's output
  side (gain c^2), while a weighted sum with equal weights cancels the rescalings to second
  order.
- ``opposed``: where sign election hurts. The demo's experts, cipher_a plus and cipher_b minus
  the same drift D of every matrix: a random drift (0.4 x each matrix's std) that the base
  absorbs (the base retrained on its echo from base + s and from base - s, half the difference
  kept, so base +- D both still echo). D is dense, ~1.5x the experts' own changes (mean
  magnitude), and of opposite sign in the two experts, so the election keeps one expert's side
  of it per entry (a random-signed drift) and DARE's drop breaks it, while a weighted sum with
  equal weights cancels it exactly (task arithmetic's diagonal is the demo's).

Each build is seeded (1 torch thread while training) and takes ~1-2 minutes on one core
(``rescaled`` trains nothing: seconds). A landscape lives in ``benchmarks/.landscapes/<name>``
and is rebuilt only when its folder lacks the stamp written last by a complete build.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.demo.build_demo import (
    BATCH, SEPARATOR, TrainingRecipe, accuracy, build, build_tokenizer, ciphers, echo, encipher, make_words,
    train,
)
from evomerge.workers.operators import task_arithmetic

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".landscapes"
DEMO = ROOT / "demo"
TASKS = ("cipher_a", "cipher_b", "cipher_mix")
SEARCH_ITEMS = 100  # per task on the built landscapes (held-out keeps the demo's 200): ~0.2 s a candidate
STAMP = ".complete"

# Lighter experts than the demo's (120 steps, not 300) over other alphabets and ciphers.
UNSEEN = TrainingRecipe(seed=11, expert_steps=120, alphabets=("acegikmo", "bdfhjlnp"))
DISTRACTOR_STEPS, DISTRACTOR_LR, DISTRACTOR_SEED = 300, 1e-3, 23
NARROW_SCALE = {"cipher_a": 0.5, "cipher_b": 1.6}  # each expert is base + scale * its task vector
LAYERED_STEPS, LAYERED_LR, LAYERED_SEED, WRONG_CIPHER_SEED = 300, 2e-3, 31, 97
RESCALE_RANGE, RESCALE_SEED = 2.0, 7  # channel scales log-uniform in [1/2, 2]
OPPOSED_SIGMA, OPPOSED_STEPS, OPPOSED_SEED = 0.4, 300, 101  # drift size (x each matrix's std), repair steps


@dataclass(frozen=True)
class Landscape:
    """Where a landscape's models and tasks are, and which model is the base."""

    name: str
    folder: Path  # holds models/<name>/ and tasks/
    models: tuple[str, ...]
    base_model: str = "base"
    model_folders: tuple[Path, ...] = ()  # default: folder/models/<name>

    def paths(self) -> dict[str, Path]:
        folders = self.model_folders or tuple(self.folder / "models" / m for m in self.models)
        return dict(zip(self.models, folders))

    @property
    def task_path(self) -> Path:
        return self.folder / "tasks"

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(m for m in self.models if m != self.base_model)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Training results depend on the thread count: build with one, as the demo does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stamped(folder: Path, make: Callable[[Path], None]) -> None:
    """Build into a temporary sibling and rename it into place, so a half build is never used."""
    if (folder / STAMP).exists():
        return
    # A folder of this process's own: two benchmarks building at once must not share one.
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _one_thread():
        make(tmp)
    (tmp / STAMP).write_text("built\n")
    if (folder / STAMP).exists():  # another process finished first: keep its build
        shutil.rmtree(tmp)
        return
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _trim_search(tasks: Path) -> None:
    """A smaller search split keeps a candidate's evaluation short (held-out is kept whole)."""
    for task in TASKS:
        file = tasks / "data" / f"{task}_search.jsonl"
        file.write_text("".join(file.read_text().splitlines(keepends=True)[:SEARCH_ITEMS]))


def _make_unseen(out: Path) -> None:
    build(out, UNSEEN)
    _trim_search(out / "tasks")


def _make_distractor(out: Path, base: Path = DEMO / "models" / "base") -> None:
    """Fine-tune ``base`` to write words backwards, replaying its echo as the demo's
    experts do; the cipher tasks never ask for it."""
    tok = build_tokenizer()
    words = make_words(TrainingRecipe().seed)
    pool = [w for split in words.values() for w in split.train]
    model = LlamaForCausalLM.from_pretrained(base)
    sample = lambda r: [echo(w) if r.random() < TrainingRecipe().replay else (w + SEPARATOR, w[::-1])  # noqa: E731
                        for w in (r.choice(pool) for _ in range(BATCH))]
    model = train(model, sample, DISTRACTOR_STEPS, DISTRACTOR_LR, DISTRACTOR_SEED, tok)
    model.save_pretrained(out / "models" / "reverse")
    tok.save_pretrained(out / "models" / "reverse")


def _save(model: LlamaForCausalLM, folder: Path) -> None:
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)


def _demo_tasks_and_base(out: Path) -> None:
    """The demo's tasks (search split trimmed) and its base, as a landscape built on them starts."""
    shutil.copytree(DEMO / "tasks", out / "tasks")
    _trim_search(out / "tasks")
    _save(LlamaForCausalLM.from_pretrained(DEMO / "models" / "base"), out / "models" / "base")


def _demo_experts_as(out: Path, change: Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """A landscape on the demo's tasks and base whose experts are the demo's, each state
    rewritten by ``change(name, state)``."""
    _demo_tasks_and_base(out)
    for name in ("cipher_a", "cipher_b"):
        model = LlamaForCausalLM.from_pretrained(DEMO / "models" / name)
        model.load_state_dict(change(name, model.state_dict()))
        _save(model, out / "models" / name)


def _make_narrow(unseen: Path) -> Callable[[Path], None]:
    def make(out: Path) -> None:
        shutil.copytree(unseen / "tasks", out / "tasks")
        base = LlamaForCausalLM.from_pretrained(unseen / "models" / "base")
        _save(base, out / "models" / "base")
        theta = {k: v.clone() for k, v in base.state_dict().items()}
        for expert, scale in NARROW_SCALE.items():
            other = LlamaForCausalLM.from_pretrained(unseen / "models" / expert).state_dict()
            base.load_state_dict({k: theta[k] + scale * (other[k] - theta[k]) for k in theta})
            _save(base, out / "models" / expert)
        _make_distractor(out, unseen / "models" / "base")
    return make


def _train_layers(model: LlamaForCausalLM, layers: range, sample: Callable[[random.Random], list[tuple[str, str]]],
                  seed: int) -> LlamaForCausalLM:
    """Train only ``layers`` (embeddings, norms and head frozen), so the skill lives there."""
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(f"model.layers.{i}.") for i in layers))
    return train(model, sample, LAYERED_STEPS, LAYERED_LR, seed, build_tokenizer())


def _make_layered(out: Path) -> None:
    """Per expert: its own cipher into its half of the layers (replaying the base's echo of the
    other alphabet), then a wrong cipher for the other alphabet into the other half (replaying
    its own cipher, so the expert itself keeps its skill)."""
    _demo_tasks_and_base(out)
    recipe = TrainingRecipe()
    words = make_words(recipe.seed)
    right, wrong = encipher(ciphers(recipe.seed)), encipher(ciphers(WRONG_CIPHER_SEED))
    n_layers = LlamaForCausalLM.from_pretrained(DEMO / "models" / "base").config.num_hidden_layers
    low, high = range(n_layers // 2), range(n_layers // 2, n_layers)
    for i, (name, own, other, mine, theirs) in enumerate((("cipher_a", "cipher_a", "cipher_b", low, high),
                                                          ("cipher_b", "cipher_b", "cipher_a", high, low))):
        own_w, other_w = words[own].train, words[other].train
        model = LlamaForCausalLM.from_pretrained(DEMO / "models" / "base")
        mix = lambda r, first, second: [first(r.choice(own_w)) if r.random() > recipe.replay  # noqa: E731
                                        else second(r.choice(other_w)) for _ in range(BATCH)]
        model = _train_layers(model, mine, lambda r: mix(r, right, echo), LAYERED_SEED + i)
        model = _train_layers(model, theirs, lambda r: [right(r.choice(own_w)) if r.random() < recipe.replay
                                                        else wrong(r.choice(other_w)) for _ in range(BATCH)],
                              LAYERED_SEED + 10 + i)
        _save(model, out / "models" / name)


def _channel_scales(config: LlamaConfig) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer, scales log-uniform in [1/RESCALE_RANGE, RESCALE_RANGE]: one per MLP channel, per
    value channel, and per rotary pair of query/key channels (RoPE turns the pair together)."""
    assert config.num_key_value_heads == config.num_attention_heads, "value channels are o_proj's inputs"
    g = torch.Generator().manual_seed(RESCALE_SEED)
    span = math.log(RESCALE_RANGE)
    draw = lambda *shape: torch.exp((torch.rand(*shape, generator=g) * 2 - 1) * span)  # noqa: E731
    head = config.hidden_size // config.num_attention_heads
    return {i: {"mlp": draw(config.intermediate_size), "v": draw(config.hidden_size),
                "qk": draw(config.num_attention_heads, head // 2).repeat(1, 2).flatten()}
            for i in range(config.num_hidden_layers)}


def _rescale(state: dict[str, torch.Tensor], scales: dict[int, dict[str, torch.Tensor]],
             power: float) -> dict[str, torch.Tensor]:
    """The same function in other weights: each channel's input side times c**power and its
    output side divided by it (MLP up rows / down columns, v rows / o columns, q rows / k rows)."""
    out = dict(state)
    pairs = {"mlp": ("mlp.up_proj", "mlp.down_proj", False), "v": ("self_attn.v_proj", "self_attn.o_proj", False),
             "qk": ("self_attn.q_proj", "self_attn.k_proj", True)}
    for i, per in scales.items():
        for kind, (scaled, divided, rows) in pairs.items():
            c = per[kind] ** power
            times, over = f"model.layers.{i}.{scaled}.weight", f"model.layers.{i}.{divided}.weight"
            out[times] = state[times] * c[:, None]
            out[over] = state[over] / (c[:, None] if rows else c[None, :])
    return out


def _make_rescaled(out: Path) -> None:
    """The demo's experts, cipher_a's channels rescaled by c and cipher_b's by 1/c."""
    scales = _channel_scales(LlamaConfig.from_pretrained(DEMO / "models" / "base"))
    _demo_experts_as(out, lambda name, state: _rescale(state, scales, 1.0 if name == "cipher_a" else -1.0))


def _absorbed_drift() -> dict[str, torch.Tensor]:
    """D, a random drift of every matrix (OPPOSED_SIGMA times its std) that the demo's base
    absorbs: the base is retrained on its echo from θ_b + s and from θ_b − s, and half the
    difference of the two is kept (the repair's even part cancels), so θ_b ± D both still echo."""
    words = make_words(TrainingRecipe().seed)
    pools = tuple(words[t].train for t in TASKS)
    model = LlamaForCausalLM.from_pretrained(DEMO / "models" / "base")
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(OPPOSED_SEED)
    s = {k: OPPOSED_SIGMA * v.std() * torch.randn(v.shape, generator=g) if v.dim() > 1 else torch.zeros_like(v)
         for k, v in theta.items()}
    ends = []
    for i, sign in enumerate((1.0, -1.0)):
        model.load_state_dict({k: theta[k] + sign * s[k] for k in theta})
        model = train(model, lambda r: [echo(r.choice(r.choice(pools))) for _ in range(BATCH)], OPPOSED_STEPS,
                      TrainingRecipe().expert_lr, OPPOSED_SEED + 1 + i, build_tokenizer())
        ends.append({k: v.clone() for k, v in model.state_dict().items()})
    return {k: (ends[0][k] - ends[1][k]) / 2 for k in theta}


def _make_opposed(out: Path) -> None:
    """The demo's experts, cipher_a plus the absorbed drift D and cipher_b minus it."""
    drift = _absorbed_drift()
    _demo_experts_as(out, lambda name, state: {k: v + (drift[k] if name == "cipher_a" else -drift[k])
                                               for k, v in state.items()})


def landscapes(cache: Path = CACHE) -> dict[str, Landscape]:
    """Every landscape, built into ``cache`` first where missing."""
    _stamped(cache / "unseen", _make_unseen)
    _stamped(cache / "distractor", _make_distractor)
    _stamped(cache / "narrow", _make_narrow(cache / "unseen"))
    _stamped(cache / "layered", _make_layered)
    _stamped(cache / "rescaled", _make_rescaled)
    _stamped(cache / "opposed", _make_opposed)
    demo_models = ("base", "cipher_a", "cipher_b")
    return {
        "demo": Landscape("demo", DEMO, demo_models),
        "unseen": Landscape("unseen", cache / "unseen", demo_models),
        "distractor": Landscape("distractor", DEMO, demo_models + ("reverse",),
                                model_folders=tuple(DEMO / "models" / m for m in demo_models)
                                + (cache / "distractor" / "models" / "reverse",)),
        "narrow": Landscape("narrow", cache / "narrow", demo_models + ("reverse",)),
        "layered": Landscape("layered", cache / "layered", demo_models),
        "rescaled": Landscape("rescaled", cache / "rescaled", demo_models),
        "opposed": Landscape("opposed", cache / "opposed", demo_models),
    }


def heldout(land: Landscape) -> dict[str, list[tuple[str, str]]]:
    import json

    out = {}
    for task in TASKS:
        rows = (json.loads(line) for line in (land.task_path / "data" / f"{task}_heldout.jsonl").open())
        out[task] = [(r["question"], r["answer"]) for r in rows]
    return out


WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


@torch.no_grad()
def task_arithmetic_scores(land: Landscape, points: list[tuple[float, ...]],
                           halves: bool = False) -> dict[tuple[float, ...], float]:
    """Held-out mean accuracy of task arithmetic θ_b + Σ w_i δ_i at each point (one weight
    per expert, in ``land.experts`` order; with ``halves``, one for the lower half of the
    layers, then one for the upper half and the rest)."""
    paths = land.paths()
    states = {m: LlamaForCausalLM.from_pretrained(p).state_dict() for m, p in paths.items()}
    model = LlamaForCausalLM.from_pretrained(paths[land.base_model]).eval()
    tok = build_tokenizer()
    data = heldout(land)
    n, half = len(land.experts), model.config.num_hidden_layers // 2
    lower = lambda key: any(key.startswith(f"model.layers.{i}.") for i in range(half))  # noqa: E731
    out: dict[tuple[float, ...], float] = {}
    for w in points:
        pick = (lambda key: w[:n] if lower(key) else w[n:]) if halves else (lambda key: w)
        merged = {k: task_arithmetic(v, [states[e][k] for e in land.experts], weight=pick(k))
                  for k, v in states[land.base_model].items()}
        model.load_state_dict(merged)
        out[w] = sum(accuracy(model, ex, tok) for ex in data.values()) / len(data)
    return out


def print_grid(land: Landscape) -> None:
    """Two experts: every pair of ``WEIGHTS``. More: the cipher experts on the diagonal
    against the extra experts' shared weight (the distractor's pull)."""
    print(f"{land.name}: task arithmetic, held-out mean over {', '.join(TASKS)}")
    if len(land.experts) == 2:
        table = task_arithmetic_scores(land, list(itertools.product(WEIGHTS, repeat=2)))
        print(f"  rows w_{land.experts[0]}, columns w_{land.experts[1]}")
        print("        " + "".join(f"{w:>7.2f}" for w in WEIGHTS))
        for wa in WEIGHTS:
            print(f"  {wa:5.2f} " + "".join(f"{table[(wa, wb)]:7.3f}" for wb in WEIGHTS))
    else:
        extra = len(land.experts) - 2
        diag, pulls = (0.5, 0.75, 1.0), (0.0, 0.5, 1.0)
        table = task_arithmetic_scores(land, [(w, w) + (d,) * extra for w, d in itertools.product(diag, pulls)])
        print(f"  rows w_{land.experts[0]} = w_{land.experts[1]}, columns w of {', '.join(land.experts[2:])}")
        print("        " + "".join(f"{d:>7.2f}" for d in pulls))
        for w in diag:
            print(f"  {w:5.2f} " + "".join(f"{table[(w, w) + (d,) * extra]:7.3f}" for d in pulls))
    best = max(table, key=table.__getitem__)
    print(f"  best {best}: {table[best]:.3f}")
    if land.name == "layered":  # what per-layer weights can reach: each expert's good half only
        points = [(1.0, 0.0, 0.0, 1.0), (1.0, 0.25, 0.25, 1.0), (1.25, 0.0, 0.0, 1.25), (0.75, 0.0, 0.0, 0.75)]
        halves = task_arithmetic_scores(land, points, halves=True)
        print(f"  per half (lower w_{land.experts[0]}, w_{land.experts[1]}; upper the same): "
              + ", ".join(f"{p} {v:.3f}" for p, v in halves.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--grid", action="store_true", help="print a task-arithmetic grid per landscape")
    parser.add_argument("--families", action="store_true",
                        help="print each merge family's best held-out over its grid (benchmarks/family_grid.py)")
    parser.add_argument("--only", help="comma-separated landscapes for --grid / --families (default: all)")
    args = parser.parse_args()
    lands = landscapes(args.cache)
    print("built: " + ", ".join(f"{n} ({lands[n].folder})" for n in lands))
    chosen = [lands[n] for n in args.only.split(",")] if args.only else list(lands.values())
    if args.grid:
        for land in chosen:
            print_grid(land)
    if args.families:
        from family_grid import print_families  # imports this module: only when asked

        with _one_thread():
            for land in chosen:
                print_families(land)


if __name__ == "__main__":
    main()
