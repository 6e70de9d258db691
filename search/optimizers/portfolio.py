"""A portfolio of searches, one per arm (a merge family at a granularity), and the rule that
moves the budget between them.

Successive halving (Karnin, Koren & Somekh, ICML 2013; Jamieson & Talwalkar, AISTATS 2016;
the inner loop of Hyperband, Li et al., JMLR 2018): every competing arm runs its own
optimizer (the config's: CMA-ES by default) until it has ``2^r`` generations of results
(rung ``r``), then the best third of the arms, ranked by the best value among exactly those
first results (equal evidence for every arm: a best-of-n grows with n), go on to the next
rung. The arm left last takes the whole budget. Coarse to fine: when that arm stagnates (no
progress in ``STALL_GENERATIONS`` generations, where progress is a value above the last level by
more than a standard error of the score: one more document right is noise, not progress), its
finer arms open, one at its best genome (every layer group starting at the per-model value)
and one at the family's untuned merge (a best coarse genome can lie in a basin that per-layer
genes do not leave in a few generations: benchmarks' ``layered``). They and the stalled arm
compete for ``2^REFINE_RUNG`` generations each, judged on those new results only; the coarser
arm wins only if it also made progress over its own best from before the round (a round that
leaves it stalled is lost), ties go to the coarser. A finer winner takes the rest of the budget; a
coarser winner goes on, and each time it is stalled again the finer arms have another round,
resuming where they stopped.

Each arm's optimizer only ever sees its own genes; the portfolio genome puts an arm code
first (:func:`~evomerge.search.optimizers.base.arm_code`). The allocation is a function of
what was told, so a resume rebuilds it from the stored outcomes, replayed in the order the
candidates were proposed (a resumed search is consistent, not bit-identical).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from evomerge.search.optimizers.base import (
    Arm, Evaluated, Optimizer, OptimizerSettings, Proposal, Update, arm_code, arm_index,
)

ETA = 3  # successive halving keeps the best 1/ETA of the arms at each rung
STALL_GENERATIONS = 2  # the last arm's generations without progress before its finer arms open
REFINE_RUNG = 1  # the stalled arm and its finer arm then compete for 2^REFINE_RUNG generations each
NOISE_Z = 1.0  # progress: a value above the last level by more than this many standard errors


def _noise(value: float, documents: int | None) -> float:
    """How far above ``value`` a result over ``documents`` search documents must be to count as
    progress: ``NOISE_Z`` standard errors of a mean of scores in [0, 1] (a variable in [0, 1]
    with mean p has variance at most p(1 - p): Bhatia & Davis, 2000); 0 when the documents are
    not known. A one-document gain is not progress: on 300 documents at 0.34 a standard error
    is 0.027, and such gains reset the stall over and over (benchmarks' ``layered``)."""
    if not documents or not math.isfinite(value):
        return 0.0
    p = min(max(value, 0.0), 1.0)
    return NOISE_Z * math.sqrt(max(p * (1 - p), 1 / documents) / documents)


@dataclass
class _Record:
    """What one arm has been told: its priors' best and its own results in order, with the
    search documents each value rests on."""

    values: list[float] = field(default_factory=list)
    genomes: list[tuple[float, ...]] = field(default_factory=list)
    documents: list[int | None] = field(default_factory=list)
    prior: tuple[float, tuple[float, ...]] | None = None
    asked: int = 0

    def best(self, first: int | None = None, start: int = 0) -> float:
        """The best value among results ``start`` to ``first`` (all: None), and the prior when
        ``start`` is 0 (an arm's untuned merge is evidence for its first round only)."""
        told = self.values[start:first]
        prior = self.prior[0] if self.prior and start == 0 else -math.inf
        return max([*told, prior], default=-math.inf)

    def progressed(self, level: float, first: int | None = None, start: int = 0) -> bool:
        """Whether a result from ``start`` to ``first`` beat ``level`` by more than its noise."""
        return any(v > level + _noise(level, n)
                   for v, n in zip(self.values[start:first], self.documents[start:first]))

    def best_genome(self) -> tuple[float, ...] | None:
        candidates = list(zip(self.values, self.genomes)) + ([self.prior] if self.prior else [])
        finite = [c for c in candidates if math.isfinite(c[0])]
        return max(finite, key=lambda c: c[0])[1] if finite else None

    def since_progress(self) -> int:
        """Results told since the last one that beat the level before it by more than its noise
        (all of them when none did since the prior): a plateau, or a creep within the noise,
        is a stall."""
        level, last = (self.prior[0] if self.prior else -math.inf), -1
        for i, (v, n) in enumerate(zip(self.values, self.documents)):
            if v > level + _noise(level, n):
                level, last = v, i
        return len(self.values) - 1 - last


def _scalar(values: tuple[float, ...] | None) -> float:
    """One number to rank arms by: the value, or the mean of several objectives; -inf on failure."""
    return sum(values) / len(values) if values else -math.inf


class Portfolio(Optimizer):
    """Successive halving over arms, each searched by an optimizer of one registered kind."""

    name = "portfolio"

    def __init__(self, settings: OptimizerSettings, inner: type[Optimizer]) -> None:
        super().__init__(settings)
        self.inner = inner
        self.arms = settings.arms
        self._subs: dict[int, Optimizer] = {}
        self._records = [_Record() for _ in self.arms]
        self.competing = [i for i, a in enumerate(self.arms) if a.refines is None]
        self.rung = 0
        self._start = {i: 0 for i in self.competing}  # results each arm had when the current round began
        self._updates = 0
        for i in self.competing:
            self._open(i, self.arms[i].x0)

    @property
    def origin(self) -> str:
        return self.inner.name

    def _open(self, i: int, x0: Sequence[float]) -> None:
        arm, s = self.arms[i], self.settings
        self._subs[i] = self.inner(replace(s, dim=arm.dim, popsize=arm.popsize, x0=tuple(x0), arms=(),
                                           seed=s.seed + 101 * i, diagonal=False))

    def _target(self, i: int) -> int:
        """Results an arm needs to have been told (in all) to finish the current rung."""
        return self._start[i] + 2**self.rung * self.arms[i].popsize

    # -- allocation ------------------------------------------------------------------------

    def _choose(self) -> int:
        """The arm to ask: the competing arm furthest behind its rung's target, else (every
        target asked, results still coming in) the leader, which keeps the workers busy."""
        if len(self.competing) == 1:
            return self.competing[0]
        behind = [i for i in self.competing if self._records[i].asked < self._target(i)]
        if behind:
            return min(behind, key=lambda i: ((self._records[i].asked - self._start[i]) / self.arms[i].popsize, i))
        return max(self.competing, key=lambda i: (self._records[i].best(), -i))

    def _advance(self) -> None:
        """Close every rung whose results are all in; open the last arm's finer arm once it stalls."""
        while len(self.competing) > 1 and all(len(self._records[i].values) >= self._target(i)
                                              for i in self.competing):
            score = {i: self._records[i].best(self._target(i), self._start[i]) for i in self.competing}
            for coarse in {self.arms[i].refines for i in self.competing} & score.keys():
                record = self._records[coarse]
                if not record.progressed(record.best(self._start[coarse]), self._target(coarse), self._start[coarse]):
                    score[coarse] = -math.inf  # a round that left the coarser arm stalled is lost
            keep = math.ceil(len(self.competing) / ETA)
            # ties go to the lower index: the coarser arm, the one with fewer genes
            self.competing = sorted(self.competing, key=lambda i: (-score[i], i))[:keep]
            self.rung += 1
        if len(self.competing) != 1:
            return
        last = self.competing[0]
        finer = [j for j, a in enumerate(self.arms) if a.refines == last]
        record = self._records[last]
        start = record.best_genome()
        if not finer or start is None or record.since_progress() < STALL_GENERATIONS * self.arms[last].popsize:
            return
        # A round: the stalled arm goes on beside its finer arms for REFINE_RUNG's generations
        # each, judged on those new results only; the best one continues. Finer arms that lost
        # a round resume where they stopped each time the coarser arm is stalled again: a move
        # that needs many genes to change together (one expert's layers for the other's) can
        # take more than one round to show.
        for j in finer:
            if j not in self._subs:
                arm = self.arms[j]
                self._open(j, [start[k] for k in arm.expand] if arm.seeded else arm.x0)
        self.competing, self.rung = [last, *finer], REFINE_RUNG
        self._start = {i: len(self._records[i].values) for i in self.competing}

    # -- the interface -------------------------------------------------------------------------

    def _split(self, result: Evaluated) -> tuple[int, Evaluated]:
        i = arm_index(result.x[0], len(self.arms))
        return i, replace(result, x=tuple(result.x[1:1 + self.arms[i].dim]))

    def ask(self) -> Proposal:
        i = self._choose()
        self._records[i].asked += 1
        p = self._subs[i].ask()
        return Proposal((arm_code(i, len(self.arms)), *p.x), p.generation)

    def _note(self, i: int, result: Evaluated) -> None:
        record, value = self._records[i], _scalar(result.values)
        if result.prior:
            if math.isfinite(value) and (record.prior is None or value > record.prior[0]):
                record.prior = (value, result.x)
        else:
            record.values.append(value)
            record.genomes.append(result.x)
            record.documents.append(result.documents)
            self._advance()

    def tell(self, result: Evaluated) -> Update | None:
        i, mine = self._split(result)
        self._note(i, mine)
        sub = self._subs.get(i)
        update = sub.tell(mine) if sub is not None else None
        if update is None:
            return None
        self._updates += 1
        return Update(self._updates - 1, update.keys)

    def restore(self, updates: Sequence[Sequence[Evaluated]], rest: Sequence[Evaluated]) -> None:
        """The allocation replayed over every outcome in proposal order (candidate ids), then
        each open arm's optimizer restored from its own batches and outcomes."""
        batches: dict[int, list[list[Evaluated]]] = {}
        others: dict[int, list[Evaluated]] = {}
        every: list[tuple[int, Evaluated]] = []
        for batch in updates:
            split = [self._split(r) for r in batch]
            batches.setdefault(split[0][0], []).append([r for _, r in split])
            every += split
        for result in rest:
            i, mine = self._split(result)
            others.setdefault(i, []).append(mine)
            every.append((i, mine))
        for i, mine in sorted(every, key=lambda e: (not e[1].prior, e[1].key)):
            self._records[i].asked += not mine.prior
            self._note(i, mine)
        for i, sub in self._subs.items():
            sub.restore(batches.get(i, []), others.get(i, []))
        self._updates = len(updates)

    def describe(self) -> str:
        spent = ", ".join(f"{a.label} {len(r.values)}" for a, r in zip(self.arms, self._records) if r.values)
        going = ", ".join(self.arms[i].label for i in self.competing)
        return (f"auto ({self.inner.name} per arm): rung {self.rung}, searching {going}; "
                f"evaluations {spent or 'none yet'}")
