"""Multi-fidelity evaluation by racing: stop scoring a candidate that cannot matter.

A candidate is first scored on a fixed random part of each task's documents (the first
``fraction`` of the study's seeded document order, the same documents for every
candidate). The evaluation goes on to the remaining documents only if the candidate could
still reach ``bar`` (the fitness it must beat to rank among the best of its generation, set
by the controller): racing in the sense of Maron & Moore (1994), with a one-sided
confidence bound as the stopping rule.

The rule: for each task whose metric is a mean of per-document 0/1 values (accuracy, exact
match: lm-eval's ``mean`` aggregation), the mean m over the n documents scored so far bounds
the mean over the whole sample of N documents from above by

    u = (n m + (N - n) w) / N,   w = the Wilson upper bound from (m + 1/(2n), n_eff), n_eff = n (N - n) / N

at one-sided confidence ``confidence``. ``w`` bounds the mean of the N - n documents not yet
seen, itself a sample: its variance around m is p (1 - p) (1/n + 1/(N - n)), hence the
effective count n_eff (a bound on the population mean alone, n_eff = n, missed 7 % of
simulated cases at 95 %), and 1/(2n) is a continuity correction for 0/1 values. Simulated
(tests/test_racing.py; uniform p, 20-100 of 80-400 documents seen) the full-sample mean
exceeded u in 2.7-4.8 % of cases at 95 % and 0.5-1.5 % at 99 %: close to nominal, not exact; the same weights as the fitness turn the tasks'
bounds into a bound on the fitness (a union bound: each task's bound holds with
probability ``confidence``, so all hold with at least 1 - k (1 - confidence) for k tasks).
A candidate whose bound is below ``bar`` stops there, and the optimizer is told the
estimate from the documents it saw (an unbiased estimate of its full score: the documents
are a uniform random subset), never a made-up penalty. Tasks whose metric is not a mean
over documents are always scored in full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


@dataclass(frozen=True)
class RacingSettings:
    """``evaluation.racing``; its defaults are the config's (search/config.py RacingConfig reads
    them from here and adds the bounds users may set)."""

    enabled: bool = False
    fraction: float = 0.2  # of each task's documents scored before the first decision
    confidence: float = 0.5  # one-sided, per task (0.5: the estimate itself decides)
    min_documents: int = 20  # no racing for a task with fewer first-stage documents
    keep: float = 0.125  # share of a generation worth finishing: sets the bar (generation_bar)
    stages: int = 3  # scoring stages: a decision after each but the last

    def first_stage(self, count: int) -> int | None:
        """How many of ``count`` documents the first stage scores; None when this task is
        not raced (racing off, or too few documents for the bound to mean anything)."""
        n = math.ceil(self.fraction * count)
        if not self.enabled or n < self.min_documents or n >= count:
            return None
        return n

    def cuts(self, count: int) -> tuple[int, ...] | None:
        """The documents scored after each stage (the last: all ``count``), or None when the
        task is not raced. Stages grow geometrically from ``fraction`` to the whole sample,
        as successive halving's rungs do (Jamieson & Talwalkar 2016): with 3 stages and
        fraction 0.2, after 20 %, 45 % and 100 % of the documents."""
        first = self.first_stage(count)
        if first is None:
            return None
        steps = max(1, self.stages - 1)
        marks = [first, *(math.ceil(self.fraction ** ((steps - k) / steps) * count) for k in range(1, steps)), count]
        return tuple(sorted({min(count, max(first, m)) for m in marks}))


def wilson_upper(mean: float, n: int, confidence: float) -> float:
    """One-sided Wilson score upper bound on a proportion from ``n`` 0/1 observations of
    mean ``mean`` (Wilson 1927): unlike the normal interval it stays above ``mean`` when
    ``mean`` is 0 or 1, which a few dozen documents often give."""
    if n <= 0:
        return 1.0
    z = NormalDist().inv_cdf(confidence)
    m = min(1.0, max(0.0, mean))
    centre = m + z * z / (2 * n)
    spread = z * math.sqrt(m * (1 - m) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def upper_bound(mean: float, seen: int, total: int, confidence: float) -> float:
    """Bound on the mean over all ``total`` documents from the ``seen`` first ones."""
    rest = total - seen
    if rest <= 0:
        return mean
    effective = max(1, round(seen * rest / total))
    return (seen * mean + rest * wilson_upper(min(1.0, mean + 0.5 / seen), effective, confidence)) / total


@dataclass(frozen=True)
class Partial:
    """A task scored on part of its documents."""

    mean: float
    seen: int
    total: int


def fitness_bound(partials: dict[str, Partial], weights: dict[str, float], confidence: float) -> float:
    """Upper bound on the weighted-mean fitness over the whole samples (tasks not raced
    enter with ``seen == total``: their bound is their score)."""
    total_weight = sum(weights[t] for t in partials)
    return sum(weights[t] * (p.mean if p.seen >= p.total else upper_bound(p.mean, p.seen, p.total, confidence))
               for t, p in partials.items()) / total_weight


def keep_going(partials: dict[str, Partial], weights: dict[str, float], bar: float | None,
               confidence: float) -> bool:
    """Whether the candidate could still reach ``bar`` (no bar: always)."""
    return bar is None or fitness_bound(partials, weights, confidence) >= bar


def generation_bar(finished: list[float], popsize: int, keep: float = 0.5) -> float | None:
    """The bar of a new candidate: the fitness of the ``⌊keep · popsize⌋``-th best (at least
    the best) of the last ``popsize`` finished candidates (in the order they were proposed;
    the controller counts the baselines, so the first generation is raced against them).

    ``keep = 0.5`` is the worst parent: CMA-ES updates from the best half of a generation
    (mu = popsize / 2, Hansen 2016), so a candidate that cannot beat the worst parent of a
    recent generation would not shape the next one. A smaller ``keep`` finishes only the
    candidates that could rank among the best ``keep`` share (successive halving's rule,
    Jamieson & Talwalkar 2016: keep the top share by the current estimate); the others are
    told their first-stage estimate, which is unbiased, only noisier. None until ``popsize``
    candidates have finished (until then every candidate is scored in full)."""
    if popsize < 2 or len(finished) < popsize:
        return None
    recent = sorted(finished[-popsize:], reverse=True)
    return recent[max(1, int(keep * popsize)) - 1]
