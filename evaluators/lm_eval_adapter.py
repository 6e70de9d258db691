"""The one module that subclasses lm-eval and reaches into its non-public members.

Two speed-ups need lm-eval's internals, and nothing else in evomerge touches them:

- ``HFLM._encode_pair`` (cached per worker: tokens do not depend on the weights),
  ``HFLM.batch_size_per_gpu`` (the batch the auto search found, set per call);
- ``ConfigurableTask._instances`` (the requests ``build_all_requests`` made, kept and reused).

tests/test_dependency_internals.py checks each of them on the installed lm-eval, so an
upgrade that renames or drops one fails there by name instead of slowing down or
mis-scoring silently. Both classes are made on first use: only workers import lm-eval.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from evomerge.evaluators.batching import BatchCache, BatchSize, model_probe


class _EncodingCache:
    """What evomerge adds to lm-eval's HFLM (mixed in by :func:`lm_class`): it tokenizes each
    (context, continuation) pair once per worker, quietly, and with ``batch="auto"`` (asked for
    on a GPU) finds each task's batch (evaluators/batching.py).

    lm-eval tokenizes every loglikelihood request again on each call; the tokens do not
    depend on the weights a worker rewrites between candidates (a fifth of a candidate's
    scoring on the tiny landscapes). Its progress bars, two or three per call, go to a
    worker's stderr, which Ray copies to the driver's log: noise, and CPU on both ends.
    lm-eval's own "auto" probes again on every call (for generation at the model's whole max
    length), from at most 64; ours probes once per task at the task's longest request."""

    def __init__(self, batch: BatchSize, **kwargs: Any) -> None:
        super().__init__(batch_size=1 if batch == "auto" else batch, **kwargs)
        self.auto = batch == "auto"
        self.sizes = BatchCache()
        self._encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        return self._batched(super().loglikelihood, requests, "loglikelihood", self._pair_tokens)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = True) -> list[float]:
        return self._batched(super().loglikelihood_rolling, requests, "loglikelihood", lambda _: self.max_length)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = True) -> list[str]:
        return self._batched(super().generate_until, requests, "generate", self._generation_tokens)

    def _batched(self, parent: Callable[..., Any], requests: list[Any], mode: str,
                 tokens_of: Callable[[Any], int]) -> Any:
        """``parent(requests)`` at the batch of the longest request of each task among them
        (the smallest of those batches), halved and run again on an out-of-memory error."""
        if not self.auto or not requests:
            return parent(requests, disable_tqdm=True)
        longest: dict[str, int] = {}
        for request in requests:
            longest[request.task_name] = max(longest.get(request.task_name, 0), tokens_of(request))
        config = self.model.config  # a route's own config: its layer count is the route's
        shape = (str(self.model.dtype), *(getattr(config, f, None) for f in
                                           ("num_hidden_layers", "hidden_size", "vocab_size")))
        keys = [(task, mode, str(self.device), shape) for task in sorted(longest)]
        batch = min(self.sizes.batch(key, longest[key[0]],
                                     model_probe(self.model, self.device, longest[key[0]], mode == "generate"))
                    for key in keys)

        def call(size: int) -> Any:
            self.batch_size_per_gpu = size
            return parent(requests, disable_tqdm=True)
        return self.sizes.run(keys, batch, call)

    def _pair_tokens(self, request: Any) -> int:
        """Tokens of a loglikelihood request's forward pass (lm-eval drops the last one and
        keeps at most its max length)."""
        context, continuation = request.args
        if context:
            context_enc, continuation_enc = self._encode_pair(context, continuation)
        else:
            context_enc, continuation_enc = [self.prefix_token_id], self.tok_encode(continuation)
        return min(len(context_enc) + len(continuation_enc), self.max_length + 1) - 1

    def _generation_tokens(self, request: Any) -> int:
        """Prompt (left-truncated as lm-eval does) plus the tokens it may generate."""
        context, kwargs = request.args
        new = int((kwargs or {}).get("max_gen_toks", self.max_gen_toks))
        return min(len(self.tok_encode(context)), max(self.max_length - new, 1)) + new

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        key = (context, continuation)
        if key not in self._encoded:
            self._encoded[key] = super()._encode_pair(context, continuation)
        context_enc, continuation_enc = self._encoded[key]
        return list(context_enc), list(continuation_enc)  # callers may change theirs


@functools.cache  # created on first use: lm-eval is imported by workers only
def lm_class() -> type:
    """lm-eval's HFLM with :class:`_EncodingCache` (constructed with ``batch`` and HFLM's arguments)."""
    from lm_eval.models.huggingface import HFLM

    return type("EncodingCacheLM", (_EncodingCache, HFLM), {})


@functools.cache  # one class, created on first use so lm-eval is imported only by workers
def reusable_task_class() -> type:
    from lm_eval.api.task import ConfigurableTask

    class ReusableTask(ConfigurableTask):  # type: ignore[misc]
        """A ConfigurableTask that renders its requests once per worker.

        lm-eval rebuilds every request on each ``evaluate`` call, compiling the Jinja
        templates anew per document: on the demo that was 75 % of a candidate's evaluation.
        Prompts do not depend on the model, so later calls only clear the responses the
        previous model left on the instances (``resps`` and ``filtered_resps``). Each set of
        documents keeps its own requests: racing (evaluators/racing.py) alternates between
        a first stage, the rest and the whole sample, which a single cached set rebuilt on
        every call (racing then cost 2.5-7 x the evaluation seconds it was meant to save).
        """

        _built: dict[tuple[object, ...], list[Any]] | None = None
        _docs: list[Any] | None = None

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)  # reads the docs' table features: eval_docs is the table until now
            # Then a list: lm-eval walks every evaluation document on each call to pick a
            # sample's, and a row of a datasets table costs ~20 us to read (racing's
            # 60-document first stage of a 300-document set spent a third of its time there).
            self._docs = list(super().eval_docs)

        @property
        def eval_docs(self) -> Any:
            return self._docs if self._docs is not None else super().eval_docs

        def build_all_requests(self, *, limit: int | None = None, **kwargs: object) -> None:
            key = (limit, kwargs.get("rank"), kwargs.get("world_size"), _frozen(kwargs.get("samples")),
                   kwargs.get("system_instruction"), kwargs.get("apply_chat_template"),
                   kwargs.get("fewshot_as_multiturn"))
            built = self._built if self._built is not None else {}
            if key in built:
                self._instances = built[key]
                for instance in self._instances:
                    instance.resps.clear()
                    instance.filtered_resps.clear()
                return
            super().build_all_requests(limit=limit, **kwargs)
            if len(built) >= _REQUEST_SETS:  # a few sets at most: forget the oldest
                built.pop(next(iter(built)))
            built[key] = self._instances
            self._built = built

    return ReusableTask


_REQUEST_SETS = 6  # the full sample, racing's stages (3 by default), and spares


def _frozen(samples: object) -> tuple[int, ...] | None:
    return None if samples is None else tuple(samples)  # type: ignore[call-overload]
