"""Build the built-in demo: three tiny Llama models, lm-eval tasks and their data.

    python -m evomerge.demo.build_demo [--out demo] [--threads 1]

The story is the paper's in miniature. Two alphabets, A = a..h and B = i..p, each with
its own secret substitution cipher. The tasks ask a model to encipher a word:

- ``cipher_a``: words over A only,   ``cab>`` -> ``fgd`` (say)
- ``cipher_b``: words over B only,
- ``cipher_mix``: words mixing both alphabets: needs both skills at once, like the
  paper's Japanese *and* math.

``models/base`` only knows the format (it echoes the word: ``cab>`` -> ``cab``).
``models/cipher_a`` is the base fine-tuned lightly on cipher A, with a third of every
batch replaying the base's echo of B words so it keeps what the base knew; likewise
``models/cipher_b``. Each expert masters its own alphabet, neither can do mixed words,
and averaging them (weights 0.5) loses both skills: the right merge weights have to be
found, which is what the search does.

Everything is seeded: words, splits, initialisation and batches. The search and held-out
splits (200 words per task each) are disjoint from each other and from training.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ALPHABET_A = "abcdefgh"
ALPHABET_B = "ijklmnop"
SEPARATOR = ">"
SPECIALS = ("<pad>", "<eos>", "<unk>")
SPLIT_SIZE = 200
WORD_LENGTHS = (3, 6)
BATCH = 128

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    search: data/{task}_search.jsonl
    heldout: data/{task}_heldout.jsonl
test_split: search
output_type: loglikelihood
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@dataclass(frozen=True)
class TrainingRecipe:
    """Training settings (the defaults are the shipped models')."""

    seed: int = 0
    base_steps: int = 600
    base_lr: float = 3e-3
    expert_steps: int = 300
    expert_lr: float = 1e-3
    replay: float = 1 / 3  # share of each expert batch that replays the base's echo
    alphabets: tuple[str, str] = (ALPHABET_A, ALPHABET_B)  # the letters of cipher A and of cipher B


def ciphers(seed: int, alphabets: tuple[str, ...] = (ALPHABET_A, ALPHABET_B)) -> dict[str, str]:
    """One fixed permutation within each alphabet."""
    rng = random.Random(seed)
    table: dict[str, str] = {}
    for alphabet in alphabets:
        shuffled = list(alphabet)
        while any(a == b for a, b in zip(alphabet, shuffled)):  # no letter maps to itself
            rng.shuffle(shuffled)
        table.update(zip(alphabet, shuffled))
    return table


def word_pool(rng: random.Random, letters: str, size: int, mixed: bool = False,
              alphabets: tuple[str, str] = (ALPHABET_A, ALPHABET_B)) -> list[str]:
    """Distinct random words; ``mixed`` words hold letters of both ``alphabets``."""
    words: set[str] = set()
    while len(words) < size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(*WORD_LENGTHS)))
        if not mixed or (set(word) & set(alphabets[0]) and set(word) & set(alphabets[1])):
            words.add(word)
    out = sorted(words)
    rng.shuffle(out)
    return out


@dataclass(frozen=True)
class Words:
    train: list[str]
    search: list[str]
    heldout: list[str]


def make_words(seed: int, alphabets: tuple[str, str] = (ALPHABET_A, ALPHABET_B)) -> dict[str, Words]:
    """Per task: disjoint train / search / held-out words."""
    rng = random.Random(seed)
    a, b = alphabets
    pools = {"cipher_a": word_pool(rng, a, 6000), "cipher_b": word_pool(rng, b, 6000),
             "cipher_mix": word_pool(rng, a + b, 6000, mixed=True, alphabets=alphabets)}
    return {t: Words(p[2 * SPLIT_SIZE:], p[:SPLIT_SIZE], p[SPLIT_SIZE:2 * SPLIT_SIZE]) for t, p in pools.items()}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; no BOS, so lm-eval scores exactly what was trained."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(ALPHABET_A + ALPHABET_B + SEPARATOR))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(vocab_size: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg)


Example = tuple[str, str]  # (question, answer)
Sampler = Callable[[random.Random], list[Example]]


def echo(word: str) -> Example:
    return word + SEPARATOR, word


def encipher(table: dict[str, str]) -> Callable[[str], Example]:
    return lambda word: (word + SEPARATOR, "".join(table[c] for c in word))


def batch(examples: Sequence[Example], tok: PreTrainedTokenizerFast) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask, and labels on the answer and <eos> only."""
    rows = []
    for question, answer in examples:
        q = tok(question, add_special_tokens=False).input_ids
        a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append((q + a, [-100] * len(q) + a))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def train(model: LlamaForCausalLM, sample: Sampler, steps: int, lr: float, seed: int,
          tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        ids, mask, labels = batch(sample(rng), tok)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, examples: Sequence[Example], tok: PreTrainedTokenizerFast) -> float:
    """Share of answers that are the greedy continuation (lm-eval's ``acc`` here)."""
    ids, mask, labels = batch([(q, a) for q, a in examples], tok)
    labels[labels == tok.eos_token_id] = -100  # lm-eval scores the answer, not <eos>
    pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    return ((pred == target) | (target == -100)).all(-1).float().mean().item()


def build(out: Path, recipe: TrainingRecipe) -> dict[str, dict[str, float]]:
    """Write models, data and task YAMLs under ``out``; returns held-out accuracies."""
    tok = build_tokenizer()
    table = ciphers(recipe.seed, recipe.alphabets)
    words = make_words(recipe.seed, recipe.alphabets)
    enc = encipher(table)
    train_a, train_b, train_mix = words["cipher_a"].train, words["cipher_b"].train, words["cipher_mix"].train

    torch.manual_seed(recipe.seed)
    base = build_model(len(tok))
    pools = (train_a, train_b, train_mix)
    base = train(base, lambda r: [echo(r.choice(r.choice(pools))) for _ in range(BATCH)],
                 recipe.base_steps, recipe.base_lr, recipe.seed, tok)
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def expert(own: list[str], other: list[str], seed: int) -> LlamaForCausalLM:
        model = build_model(len(tok))
        model.load_state_dict(state)
        return train(model, lambda r: [echo(r.choice(other)) if r.random() < recipe.replay else enc(r.choice(own))
                                       for _ in range(BATCH)], recipe.expert_steps, recipe.expert_lr, seed, tok)

    trained = {"base": base, "cipher_a": expert(train_a, train_b, recipe.seed + 1),
               "cipher_b": expert(train_b, train_a, recipe.seed + 2)}
    for name, model in trained.items():
        model.save_pretrained(out / "models" / name)  # transformers 5 always writes safetensors
        tok.save_pretrained(out / "models" / name)
    data = out / "tasks" / "data"
    data.mkdir(parents=True, exist_ok=True)
    for task, split in words.items():
        for name in ("search", "heldout"):
            with open(data / f"{task}_{name}.jsonl", "w") as f:
                for word in getattr(split, name):
                    q, a = enc(word)
                    f.write(json.dumps({"question": q, "answer": a}) + "\n")
        (out / "tasks" / f"{task}.yaml").write_text(TASK_YAML.format(task=task))
    return {name: {task: accuracy(model, [enc(w) for w in split.heldout], tok) for task, split in words.items()}
            for name, model in trained.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    scores = build(args.out, TrainingRecipe())
    print(f"built in {time.time() - start:.0f}s; held-out accuracy:")
    for name, per_task in scores.items():
        print(f"  {name:9s} " + "  ".join(f"{t} {v:.3f}" for t, v in per_task.items()))


if __name__ == "__main__":
    main()
