"""What tests share besides fixtures: tiny real models and tokenizers built on the fly,
configs written for them, the repository's paths, and the Debian tools some tests drive.
Fixtures built from these live in tests/conftest.py."""

from __future__ import annotations

import functools
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests import cli_fork

ROOT = Path(__file__).resolve().parent.parent


DEMO = ROOT / "demo"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of an ``evomerge`` subprocess: this process's as it is when called (a module
    using the ``joined_ray`` fixture has the shared Ray's address in it), the checkout importable."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def run_evomerge(*args: str, cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m evomerge *args`` in a process of its own (forked from the suite's server of
    pre-imported commands, tests/cli_fork.py), with :func:`cli_env` (plus ``env``): its exit
    status, stdout and stderr."""
    from tests import cli_fork

    return cli_fork.run(args, cwd, cli_env(**env), timeout)


def start_evomerge(*args: str, cwd: Path, text: bool = False, **env: str) -> "cli_fork.Running":
    """``python -m evomerge *args`` started as :func:`run_evomerge` starts it, running: a
    ``subprocess.Popen`` (its stdout and stderr piped, bytes unless ``text``)."""
    from tests import cli_fork

    return cli_fork.start(args, cwd, cli_env(**env), text)


def char_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate("0123456789+-=")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


# ChatML, as SmolLM2-Instruct and Qwen2-Instruct use it.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@functools.cache
def _bpe_json() -> str:
    """A byte-level BPE (digits split one by one, as SmolLM2's) trained here on a small
    local corpus of sums, differences and chat phrases; serialized, to build fresh copies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    phrases = ["You are a helpful assistant.", "Answer with a number.", "What is the sum?", "Question: Answer:",
               "system user assistant", "The result of the calculation is"]
    corpus = [f"{a}{op}{b}={a + b if op == '+' else a - b}" for op in "+-" for a, b in
              ((rng.randint(10, 99), rng.randint(10, 99)) for _ in range(200))] + phrases * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return str(tok.to_str())


def bpe_tokenizer():  # type: ignore[no-untyped-def]
    """The real-format tokenizer of the architecture fixtures: byte-level BPE, a ChatML chat
    template, EOS <|im_end|> and pad = EOS (as SmolLM2-135M-Instruct)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe_json()), eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token=None, chat_template=CHATML)


def save_tiny_model(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0, noise: float = 0.0,
                    base_seed: int = 0) -> Path:
    """A random tiny Llama (+ char tokenizer); ``noise`` perturbs the ``base_seed`` model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(base_seed)
    return _perturb_and_save(LlamaForCausalLM(cfg), folder, seed, noise)


def _perturb_and_save(model, folder: Path, seed: int, noise: float, tokenizer=None) -> Path:  # type: ignore[no-untyped-def]
    """Add ``noise`` · N(0, 1) (seeded by ``seed``) to every weight; save with ``tokenizer``
    (default: the char tokenizer)."""
    import torch

    if noise:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder)
    (tokenizer or char_tokenizer()).save_pretrained(folder)
    return folder


def write_config(path: Path, models: dict[str, Path], tasks: Path, **overrides: object) -> Path:
    """A search config over ``models`` (first = base) and the tiny tasks."""
    import yaml

    names = list(models)
    cfg: dict[str, object] = {
        "study": "t",
        "models": [{"name": n, "path": str(p)} for n, p in models.items()],
        "base_model": names[0],
        # one method at one granularity: the tests of faults, resume and storage predate method
        # auto (the default), whose own tests name neither (tests/test_auto_e2e.py)
        "merge": {"method": "dare_ties", "granularity": "model"},
        "optimizer": {"popsize": 4},
        "evaluation": {"task_paths": [str(tasks)], "tasks": [{"name": "tiny_add"}, {"name": "tiny_sub"}],
                       "search_split": "search", "heldout_split": "heldout", "heldout_top_k": 2},
        "budget": {"max_trials": 12},
        "workers": {"count": 2},
    }
    for key, value in overrides.items():
        cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def save_tiny_arch(folder: Path, arch: str, seed: int = 0, noise: float = 0.0) -> Path:
    """A random tiny model of ``arch`` ("llama", "qwen2", "mistral") sized like
    :func:`save_tiny_model`, in the format of a real checkpoint: the BPE tokenizer with a
    ChatML template and pad = EOS (:func:`bpe_tokenizer`); ``noise`` perturbs the seed-0 model.

    llama: tied embeddings, as SmolLM2-135M. qwen2: ``layer_types`` with a sliding layer
    (window 4, shorter than the tests' inputs), q/k/v biases and tied embeddings, as in
    Qwen2-0.5B. mistral: untied embeddings, a model-wide ``sliding_window`` of 4 and
    grouped-query attention."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    tokenizer = bpe_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if arch == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=True)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                          tie_word_embeddings=True)
        assert cfg.layer_types == ["full_attention", "sliding_attention"], cfg.layer_types
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=4, tie_word_embeddings=False)
    else:
        raise ValueError(f"no tiny builder for architecture {arch!r}")
    torch.manual_seed(0)
    return _perturb_and_save(AutoModelForCausalLM.from_config(cfg), folder, seed, noise, tokenizer)


ARCHITECTURES = ("llama", "qwen2", "mistral")


def system_tool(*names: str) -> str:
    """The first of ``names`` found on PATH (Debian packages the suite uses: docker-compose,
    chromium). ``.ci/run`` installs them and sets EVOMERGE_CI, so there a missing one fails
    the test; on a developer's machine without it the test is skipped, saying what to install."""
    import shutil

    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"{' or '.join(names)} not installed (Debian package; .ci/run installs it)"
    if os.environ.get("EVOMERGE_CI"):
        pytest.fail(message)
    pytest.skip(message)


def merge_launches(names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """benchmarks/merge_launches.py's (launches, syncs) for one bfloat16 tensor of FUSE_MIN entries per
    operator, counted in a process of its own (the benchmark turns the native kernels off for its
    whole process)."""
    code = ("import sys, torch, merge_launches as m\n"
            "torch._inductor.config.cpp.enable_kernel_profile = True\n"  # as the benchmark's main: C++ kernels show
            "for name in sys.argv[1:]:\n"
            "    c = m.count(name, m.fused.FUSE_MIN, torch.bfloat16)\n"
            "    print(name, c.launches, c.syncs)\n")
    env = cli_env(PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = {name: (int(launches), int(syncs)) for name, launches, syncs in map(str.split, proc.stdout.splitlines())}
    assert list(counts) == list(names), proc.stdout
    return counts
