"""The leaderboard: ranked candidates with search and held-out scores, as text or JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from evomerge.storage.repository import BASELINE_ORIGINS, CandidateRecord
from evomerge.workers.recipe import Recipe


@dataclass(frozen=True)
class Row:
    rank: int
    trial: int | None
    candidate: int
    origin: str
    fitness: float
    scores: dict[str, float]
    heldout_fitness: float | None
    heldout: dict[str, float] | None
    recipe: str


@dataclass(frozen=True)
class Board:
    study: str
    done: int
    failed: int
    running: int
    queued: int
    rows: list[Row]
    optimizer: str = ""  # what proposed the evolved candidates
    front: list[Row] = field(default_factory=list)  # multi-objective: the Pareto front over the tasks

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def best_candidate(cands: list[CandidateRecord]) -> CandidateRecord | None:
    """The best completed candidate by search fitness (the earliest on a tie), or None."""
    done = [c for c in cands if c.state == "complete" and c.fitness is not None]
    return max(done, key=lambda c: (c.fitness, -c.id)) if done else None


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(cands: list[CandidateRecord], objectives: Sequence[str]) -> list[CandidateRecord]:
    """The completed candidates that no other beats on every objective (task score) at once,
    best fitness first."""
    done = [c for c in cands if c.state == "complete" and c.duplicate_of is None and c.scores]
    points = [(c, tuple((c.scores or {}).get(t, float("-inf")) for t in objectives)) for c in done]
    front = [c for c, v in points if not any(_dominates(w, v) for _, w in points)]
    return sorted(front, key=lambda c: (-(c.fitness or 0.0), c.id))


def _row(rank: int, cand: CandidateRecord) -> Row:
    return Row(rank, cand.trial_number, cand.id, cand.origin, float(cand.fitness or 0.0), cand.scores or {},
               cand.heldout_fitness, cand.heldout, Recipe.from_json(cand.recipe_json).summary())


def build(study: str, cands: list[CandidateRecord], top: int, optimizer: str = "",
          objectives: Sequence[str] = ()) -> Board:
    """Top ``top`` evolved candidates plus every baseline, ranked by search fitness; with
    several ``objectives``, also the Pareto front over them."""
    complete = [c for c in cands if c.state == "complete" and c.fitness is not None and c.duplicate_of is None]
    ranked = sorted(complete, key=lambda c: (-(c.fitness or 0.0), c.id))
    shown, evolved = [], 0
    for rank, cand in enumerate(ranked, 1):
        if cand.evolved:
            evolved += 1
            if evolved > top:
                continue
        shown.append(_row(rank, cand))
    count = {s: sum(1 for c in cands if c.state == s) for s in ("complete", "failed", "running", "queued")}
    ranks = {c.id: rank for rank, c in enumerate(ranked, 1)}
    front = [_row(ranks[c.id], c) for c in pareto_front(cands, objectives)] if len(objectives) > 1 else []
    return Board(study, count["complete"] + count["failed"], count["failed"], count["running"],
                 count["queued"], shown, optimizer, front)


def combine(study: str, stages: list[tuple[str, Board]]) -> Board:
    """One board over several studies (PS+DFS stages): rows re-ranked by search fitness, each
    origin prefixed by its stage."""
    rows, seen = [], set()
    for stage, board in stages:
        for r in board.rows:
            if r.origin in BASELINE_ORIGINS and r.recipe in seen:
                continue  # a baseline already shown by an earlier stage
            seen.add(r.recipe)
            rows.append(replace(r, origin=f"{stage}:{r.origin}"))
    rows.sort(key=lambda r: (-r.fitness, r.origin, r.candidate))
    rows = [replace(r, rank=i) for i, r in enumerate(rows, 1)]
    total = {f: sum(getattr(b, f) for _, b in stages) for f in ("done", "failed", "running", "queued")}
    optimizer = ", ".join(f"{stage}: {b.optimizer}" for stage, b in stages if b.optimizer)
    return Board(study, total["done"], total["failed"], total["running"], total["queued"], rows, optimizer)


def render(board: Board) -> str:
    """Plain-text tables: the leaderboard, and the Pareto front when there is one."""
    lines = [f"study {board.study}: {board.done} trials done ({board.failed} failed), "
             f"{board.running} running, {board.queued} queued"]
    if board.optimizer:
        lines.append(f"optimizer: {board.optimizer}")
    lines.append(_table(board.rows))
    if board.front:
        lines.append(f"\nPareto front over the tasks ({len(board.front)} non-dominated recipes; "
                     "replay any with --trial N):")
        lines.append(_table(board.front))
    return "\n".join(lines)


def _table(rows: list[Row]) -> str:
    tasks = sorted({t for r in rows for t in r.scores})
    head = ["rank", "trial", "origin", "fitness"] + tasks + ["heldout"] + [f"ho:{t}" for t in tasks] + ["recipe"]
    lines: list[str] = []
    table = [head]
    for r in rows:
        ho = r.heldout or {}
        table.append([str(r.rank), "-" if r.trial is None else str(r.trial), r.origin, f"{r.fitness:.4f}"]
                     + [f"{r.scores.get(t, float('nan')):.4f}" for t in tasks]
                     + ["-" if r.heldout_fitness is None else f"{r.heldout_fitness:.4f}"]
                     + [f"{ho[t]:.4f}" if t in ho else "-" for t in tasks] + [r.recipe])
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines)
