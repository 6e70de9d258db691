"""Header-only Llama models of any size: real config.json and safetensors files whose headers
name every tensor's dtype, shape and data offsets, truncated (sparsely: no byte of weights is
written) to the size the data would take. What reads headers only (``evomerge plan``, source
validation) sees a 70 B model in a few KiB of disk; reading a weight gives zeros.

    python benchmarks/header_models.py OUT --size 7b    # OUT/{base,expert_a,expert_b}, OUT/search.yaml
    evomerge plan OUT/search.yaml --gpus 1 --gpu-memory 139 --host-memory 128

Sizes (:data:`SHAPES`): ``1b`` (a random ~1 B Llama), ``7b`` and ``70b`` (Llama-2-7B's and
Llama-2-70B's shapes). The tensors' names and shapes come from the transformers model built on
the meta device, so they are exactly what a worker would load.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

SHAPES: dict[str, dict[str, int]] = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
}
DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}
SHARD_BYTES = 5 * 10**9  # as transformers' save_pretrained shards


def write_header_only(file: Path, tensors: dict[str, tuple[str, tuple[int, ...], int]]) -> int:
    """A safetensors file of ``tensors`` (name -> (dtype, shape, itemsize)) whose data is a hole:
    the header, then the file extended to its full size. Returns that size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, itemsize) in tensors.items():
        end = offset + itemsize * _numel(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
    os.truncate(file, 8 + len(text) + offset)
    return 8 + len(text) + offset


def llama_folder(folder: Path, size: str | dict[str, int], dtype: str = "bfloat16",
                 shard_bytes: int = SHARD_BYTES) -> Path:
    """A header-only Llama at ``folder``: config.json and safetensors shards (with
    model.safetensors.index.json when there is more than one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(SHAPES[size] if isinstance(size, str) else size), dtype=dtype, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    code, itemsize = DTYPES[dtype]
    shards: list[dict[str, tuple[str, tuple[int, ...], int]]] = [{}]
    used = 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * itemsize
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = (code, tuple(tensor.shape), itemsize)
        used += nbytes
    if len(shards) == 1:
        write_header_only(folder / "model.safetensors", shards[0])
        return folder
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(write_header_only(folder / n, s) for n, s in zip(names, shards))
    weight_map = {key: n for n, s in zip(names, shards) for key in s}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def search_config(out: Path, size: str | dict[str, int], dtype: str = "bfloat16", experts: int = 2) -> Path:
    """Header-only ``base`` and ``expert_*`` models in ``out`` and a search config over them."""
    names = ["base", *(f"expert_{chr(ord('a') + i)}" for i in range(experts))]
    for name in names:
        llama_folder(out / name, size, dtype)
    models = "\n".join(f"  - {{name: {n}, path: {n}}}" for n in names)
    (out / "search.yaml").write_text(
        f"models:\n{models}\nbase_model: base\nevaluation:\n  tasks: [{{name: task}}]\n"
        f"workers:\n  dtype: {dtype}\n")
    return out / "search.yaml"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--experts", type=int, default=2)
    args = parser.parse_args()
    print(search_config(args.out, args.size, args.dtype, args.experts))
