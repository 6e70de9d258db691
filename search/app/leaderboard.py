"""The leaderboard: evolved candidates ranked by search fitness, the baselines in a section of
their own, held-out scores, and the failures counted by reason; as text (120 columns) or JSON.

A candidate is named by one number everywhere: its trial number, the one optuna-dashboard
shows and ``evomerge replay --trial N`` takes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from evomerge.search.families import family_label
from evomerge.search.origins import evolved
from evomerge.storage.kinds import State
from evomerge.storage.repository import CandidateRecord
from evomerge.workers.recipe_text import summary

WIDTH = 120  # the text board fits a 120-column terminal
_ELLIPSIS = "…"


@dataclass(frozen=True)
class Row:
    rank: int | None  # among the evolved candidates; None for a baseline
    trial: int | None
    origin: str
    fitness: float
    scores: dict[str, float]
    heldout_fitness: float | None
    heldout: dict[str, float] | None
    summary: str  # the recipe in one line
    recipe: dict[str, Any]  # the recipe itself (workers/recipe.py's JSON)
    genes: list[float] | None  # the optimizer's genotype; None for a baseline


@dataclass(frozen=True)
class Board:
    study: str
    done: int
    failed: int
    running: int
    queued: int
    rows: list[Row]  # the top evolved candidates, best first
    baselines: list[Row] = field(default_factory=list)  # sources and untuned merges, best first
    failures: list[tuple[str, int]] = field(default_factory=list)  # (reason, count), most frequent first
    optimizer: str = ""  # what proposed the evolved candidates
    front: list[Row] = field(default_factory=list)  # multi-objective: the Pareto front over the tasks
    # the evolved candidates per merge family (method auto): (family, evaluations, best search fitness)
    families: list[tuple[str, int, float | None]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["failures"] = [{"reason": r, "count": n} for r, n in self.failures]
        data["families"] = [{"family": f, "evaluations": n, "best_fitness": b} for f, n, b in self.families]
        return data


def count_reasons(reasons: Iterable[str | None]) -> list[tuple[str, int]]:
    """Failure reasons (whitespace folded, 200 characters at most) with their counts, most
    frequent first."""
    return Counter(" ".join((r or "no reason recorded").split())[:200] for r in reasons).most_common()


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(cands: list[CandidateRecord], objectives: Sequence[str]) -> list[CandidateRecord]:
    """The completed candidates that no other beats on every objective (task score) at once,
    best fitness first."""
    done = [c for c in cands if c.state == State.COMPLETE and c.duplicate_of is None and c.scores]
    points = [(c, tuple((c.scores or {}).get(t, float("-inf")) for t in objectives)) for c in done]
    front = [c for c, v in points if not any(_dominates(w, v) for _, w in points)]
    return sorted(front, key=lambda c: (-(c.fitness or 0.0), c.id))


def _family(recipe: dict[str, Any]) -> str:
    if "method" not in recipe:  # a route (DFS) or a source
        return "route" if "route" in recipe else "source"
    return family_label(str(recipe["method"]), str(recipe.get("layout", "model")))


def budget_by_family(cands: Iterable[CandidateRecord]) -> list[tuple[str, int, float | None]]:
    """The evolved candidates that ran, per merge family: how many, and the best search
    fitness; most evaluations first."""
    spent: dict[str, list[float | None]] = {}
    for c in cands:
        if evolved(c) and c.state in (State.COMPLETE, State.FAILED) and c.duplicate_of is None:
            spent.setdefault(_family(json.loads(c.recipe_json)), []).append(c.fitness)
    rows = [(f, len(v), max((x for x in v if x is not None), default=None)) for f, v in spent.items()]
    return sorted(rows, key=lambda r: (-r[1], r[0]))


def _row(rank: int | None, cand: CandidateRecord) -> Row:
    recipe = json.loads(cand.recipe_json)  # as stored: no pydantic model for a quick status
    return Row(rank, cand.trial_number, cand.origin, float(cand.fitness or 0.0), cand.scores or {},
               cand.heldout_fitness, cand.heldout, summary(recipe), recipe,
               list(cand.genes) if cand.genes is not None else None)


def build(study: str, cands: list[CandidateRecord], top: int, optimizer: str = "",
          objectives: Sequence[str] = ()) -> Board:
    """The top ``top`` evolved candidates and every baseline, by search fitness; with several
    ``objectives``, also the Pareto front over them."""
    complete = [c for c in cands if c.state == State.COMPLETE and c.fitness is not None and c.duplicate_of is None]
    ranked = sorted((c for c in complete if evolved(c)), key=lambda c: (-(c.fitness or 0.0), c.id))
    ranks = {c.id: rank for rank, c in enumerate(ranked, 1)}
    baselines = sorted((c for c in complete if not evolved(c)), key=lambda c: (-(c.fitness or 0.0), c.id))
    count = Counter(c.state for c in cands)
    front = [_row(ranks.get(c.id), c) for c in pareto_front(cands, objectives)] if len(objectives) > 1 else []
    return Board(study, count[State.COMPLETE] + count[State.FAILED], count[State.FAILED], count[State.RUNNING],
                 count[State.QUEUED],
                 [_row(ranks[c.id], c) for c in ranked[:top]], [_row(None, c) for c in baselines],
                 count_reasons(c.error for c in cands if c.state == State.FAILED), optimizer, front,
                 budget_by_family(cands))


def combine(study: str, stages: list[tuple[str, Board]]) -> Board:
    """One board over several studies (PS+DFS stages): evolved rows re-ranked by search
    fitness, baselines shown once, each origin prefixed by its stage."""
    rows, baselines, seen = [], [], set()
    for stage, board in stages:
        rows += [replace(r, origin=f"{stage}:{r.origin}") for r in board.rows]
        for r in board.baselines:
            if r.summary not in seen:  # a baseline already shown by an earlier stage is not repeated
                seen.add(r.summary)
                baselines.append(replace(r, origin=f"{stage}:{r.origin}"))
    rows.sort(key=lambda r: (-r.fitness, r.origin, r.trial if r.trial is not None else -1))
    rows = [replace(r, rank=i) for i, r in enumerate(rows, 1)]
    baselines.sort(key=lambda r: -r.fitness)
    total = {f: sum(getattr(b, f) for _, b in stages) for f in ("done", "failed", "running", "queued")}
    failures: Counter[str] = Counter()
    for _, b in stages:
        failures.update(dict(b.failures))
    optimizer = ", ".join(f"{stage}: {b.optimizer}" for stage, b in stages if b.optimizer)
    families = [(f"{stage}:{f}", n, best) for stage, b in stages for f, n, best in b.families]
    return Board(study, total["done"], total["failed"], total["running"], total["queued"], rows, baselines,
                 failures.most_common(), optimizer, families=families)


def render(board: Board, width: int = WIDTH) -> str:
    """Plain text, no line longer than ``width``: the evolved candidates, the baselines, the
    Pareto front when there is one, and the failures by reason."""
    lines = [_clip(f"study {board.study}: {board.done} trials done ({board.failed} failed), "
                   f"{board.running} running, {board.queued} queued", width)]
    if board.optimizer:
        lines.append(_clip(f"optimizer: {board.optimizer}", width))
    if len(board.families) > 1:
        lines.append(_clip("evaluations per merge family: " + ", ".join(
            f"{f} {n} (best {_num(b)})" for f, n, b in board.families), width))
    tasks = sorted({t for r in (*board.rows, *board.baselines) for t in r.scores})
    lines.append("task cells: search / held-out score; replay a candidate with --trial N (its trial number)")
    lines += ["", f"evolved candidates (top {len(board.rows)}, by search fitness):"]
    lines += _table(board.rows, tasks, width) if board.rows else ["  none yet"]
    lines += ["", "baselines (source models and untuned merges):"]
    lines += _table(board.baselines, tasks, width) if board.baselines else ["  none yet"]
    if board.front:
        lines += ["", f"Pareto front over the tasks ({len(board.front)} non-dominated recipes; "
                      "replay any with --trial N):"]
        lines += _table(board.front, tasks, width)
    if board.failures:
        lines += ["", f"failures by reason ({board.failed} failed):"]
        lines += [_clip(f"  {n} x {reason}", width) for reason, n in board.failures]
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + _ELLIPSIS


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _table(rows: list[Row], tasks: list[str], width: int) -> list[str]:
    """One line of numbers per candidate, its recipe on the line below (clipped to ``width``;
    the whole recipe is in ``status --json``). Per-task cells are left out when they do not fit."""
    head = ["rank", "trial", "origin", "fitness", "heldout"]
    table = [[("-" if r.rank is None else str(r.rank)), ("-" if r.trial is None else str(r.trial)),
              r.origin, _num(r.fitness), _num(r.heldout_fitness)] for r in rows]
    task_cells = [[f"{r.scores.get(t, float('nan')):.3f}/"
                   + ("-" if not r.heldout or t not in r.heldout else f"{r.heldout[t]:.3f}") for t in tasks]
                  for r in rows]
    with_tasks = [h + t for h, t in zip(table, task_cells)]
    widths = [max(len(row[i]) for row in [head + tasks, *with_tasks]) for i in range(len(head) + len(tasks))]
    if sum(widths) + 2 * len(widths) > width:  # too many tasks for the width: numbers only
        widths, with_tasks = widths[: len(head)], table
    else:
        head = head + tasks
    right = {0, 1} | set(range(3, len(head)))  # numbers are right-aligned

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [_clip(line([h[: w] for h, w in zip(head, widths)]).rstrip(), width)]
    for row, r in zip(with_tasks, rows):
        out.append(_clip(line(row).rstrip(), width))
        out.append(_clip(" " * 6 + r.summary, width))
    return out
