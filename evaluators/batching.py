"""The evaluation batch: configured, or found per task (``evaluation.batch_size: auto``).

With ``auto`` a GPU worker finds, for each task, the largest batch of that task's longest
request (context + continuation, or prompt + generated tokens) that fits on its device, and
keeps it for the life of the worker: candidates share one architecture, so what fits for the
first fits for every other. An out-of-memory error later (fragmentation, another worker on
the same GPU) halves the batch and runs the call again; the candidate is never lost for it.

The search is a pure function of a ``fits(batch)`` callable that raises an out-of-memory
error when the batch does not fit (:func:`largest_fitting`, :class:`BatchCache`); the probe
that makes one from a model is :func:`model_probe`.

On the CPU nothing is probed: host memory does not raise, it swaps or meets the OOM killer.
``auto`` is :data:`CPU_BATCH` there, deterministic (the memory plan caps it where a
sequence is too large for the host). torch is imported where it is used: the memory plan
and the search's stages read the batch rules without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    import torch

BatchSize = int | Literal["auto"]
# auto on the CPU. benchmarks/eval_throughput.py at 135 M, one thread: documents per second
# against batch 1 are 2.2x at batch 8 and 2.3x at 16-64 for loglikelihood, 3.4x at 8 and 8.3x
# at 32 for generation (docs/performance.md): 32 takes nearly all of both.
CPU_BATCH = 32
GPU_MAX_BATCH = 512  # the most auto probes on a GPU; lm-eval's own "auto" stops at 64
T = TypeVar("T")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory (CUDA's own error, or the
    RuntimeError other backends and older torch raise)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def planned_batch(batch_size: BatchSize, fits: int | None = None, gpu: bool = False) -> int:
    """The batch a worker is expected to use: the configured one, or for ``auto`` what fits
    (``fits``: the memory plan's count, None: unknown) capped at :data:`CPU_BATCH` on the
    CPU and :data:`GPU_MAX_BATCH` on a GPU."""
    if batch_size != "auto":
        return batch_size if fits is None else min(batch_size, fits)
    cap = GPU_MAX_BATCH if gpu else CPU_BATCH
    return cap if fits is None else min(cap, fits)


def largest_fitting(fits: Callable[[int], object], start: int) -> int:
    """The largest batch in [1, ``start``] for which ``fits(batch)`` returns without an
    out-of-memory error, assuming what fits is monotone in the batch: ``start``, else
    halving until one fits, then bisecting between it and the last that did not. Other
    errors, and an out-of-memory error at batch 1, propagate."""
    batch, too_big = max(start, 1), None
    while True:
        try:
            fits(batch)
            break
        except Exception as exc:
            if batch == 1 or not is_out_of_memory(exc):
                raise
            _free()
            too_big, batch = batch, batch // 2
    if too_big is None:
        return batch
    low, high = batch, too_big  # low fits, high does not
    while high - low > 1:
        middle = (low + high) // 2
        try:
            fits(middle)
            low = middle
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            _free()
            high = middle
    return low


@dataclass(frozen=True)
class Found:
    """A batch that fit for requests of up to ``tokens`` tokens."""

    tokens: int
    batch: int


class BatchCache:
    """The batch found per key (a task, the device, the model's shape), for the life of a
    worker. A request longer than the one a batch was found for is probed again; an
    out-of-memory error at run time halves the kept batch (:meth:`run`)."""

    def __init__(self, start: int = GPU_MAX_BATCH) -> None:
        self.start = start
        self._found: dict[tuple[object, ...], Found] = {}

    def batch(self, key: tuple[object, ...], tokens: int, fits: Callable[[int], object]) -> int:
        """The batch for ``key``'s requests of up to ``tokens`` tokens, probed with ``fits``
        (called only when nothing is kept for a request this long)."""
        kept = self._found.get(key)
        if kept is None or tokens > kept.tokens:
            self._found[key] = Found(tokens, largest_fitting(fits, self.start))
        return self._found[key].batch

    def run(self, keys: list[tuple[object, ...]], batch: int, call: Callable[[int], T]) -> T:
        """``call(batch)``; on an out-of-memory error, the batch halved (kept for ``keys``)
        and the call made again, down to batch 1, where the error propagates."""
        while True:
            try:
                return call(batch)
            except Exception as exc:
                if batch == 1 or not is_out_of_memory(exc):
                    raise
                _free()
                batch //= 2
                for key in keys:
                    kept = self._found.get(key)
                    if kept is not None and kept.batch > batch:
                        self._found[key] = Found(kept.tokens, batch)

    def found(self) -> dict[tuple[object, ...], Found]:
        """What is kept, by key (a copy)."""
        return dict(self._found)


def model_probe(model: Any, device: torch.device, tokens: int, generate: bool) -> Callable[[int], None]:
    """A ``fits(batch)`` for ``model``: one forward pass over ``batch`` sequences of ``tokens``
    tokens as a scoring pass makes it (every position's logits and their float32
    log-softmax, as lm-eval computes them) or, for generation, with a KV cache for all of
    them and the last position's logits (the prefill of ``model.generate`` at its longest)."""
    import torch

    def fits(batch: int) -> None:
        ids = torch.ones((batch, tokens), dtype=torch.long, device=device)
        with torch.no_grad():
            for _ in range(2):  # a second pass meets the allocator as the first left it
                if generate:
                    try:
                        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                    except TypeError:  # an architecture without logits_to_keep: every position's
                        out = model(input_ids=ids, use_cache=True)
                else:
                    out = torch.log_softmax(model(input_ids=ids, use_cache=False).logits, dim=-1,
                                            dtype=torch.float32)
                del out
        del ids
    return fits


def _free() -> None:
    """Give cached blocks back after an out-of-memory error, so the smaller batch sees them."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
