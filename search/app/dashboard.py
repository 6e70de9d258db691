"""What optuna-dashboard shows beyond Optuna's own columns, and how it is served.

- Each search trial carries a note (optuna-dashboard's Markdown note, shown at the top of
  the trial's page) with its per-task scores, and, once the trial is re-scored on the
  held-out split, those scores beside them: the same trial number everywhere. Notes live in
  the study's system attributes, so they can be written after Optuna froze the trial.
- The study carries plotly figures (:mod:`search.app.plots`) that the dashboard draws on the
  study's page; :class:`StudyPictures` refreshes them when the best changes (at most every
  ``min_interval_s``) and when a phase ends.
- :class:`DashboardObserver` writes both as the search goes: an observer the commands give
  the controller (search/observers.py), writing into the ledger's study.
- :func:`serve` runs the dashboard's WSGI app on a threading server: ``run_server`` serves
  through bottle's single-threaded development server, where one slow request (a large
  study's trial list) stalls every other tab and API poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from evomerge.search.app.dashboard_notes import first_trial_note, save_trial_note
from evomerge.search.app.plots import study_figures
from evomerge.search.observers import QuietObserver
from evomerge.storage.kinds import State
from evomerge.storage.repository import CandidateRecord

if TYPE_CHECKING:
    from evomerge.search.ledger import Ledger


def trial_note(scores: Mapping[str, float], fitness: float | None,
               heldout: Mapping[str, float] | None = None, heldout_fitness: float | None = None) -> str:
    """The Markdown note of a scored trial: one row per task, search and (when re-scored)
    held-out side by side, then the fitness."""
    cols = "| task | search | held-out |\n|---|---:|---:|\n" if heldout is not None else "| task | search |\n|---|---:|\n"
    rows = []
    for task in sorted(set(scores) | set(heldout or {})):
        cells = [_num(scores.get(task))] + ([_num(heldout.get(task))] if heldout is not None else [])
        rows.append(f"| {task} | " + " | ".join(cells) + " |")
    total = [f"**{_num(fitness)}**"] + ([f"**{_num(heldout_fitness)}**"] if heldout is not None else [])
    rows.append("| **fitness** | " + " | ".join(total) + " |")
    head = "### Scores\n\n" if heldout is None else "### Scores (search split and held-out split)\n\n"
    return head + cols + "\n".join(rows) + "\n"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def save_figures(study: optuna.Study, cands: Sequence[CandidateRecord]) -> int:
    """Store the study's figures (replacing earlier ones by id); returns how many."""
    from optuna_dashboard import save_plotly_graph_object

    figures = study_figures(cands)
    for figure in figures:
        save_plotly_graph_object(study, figure, graph_object_id=figure.id)  # type: ignore[arg-type]
    return len(figures)


class StudyPictures:
    """Keeps the study's figures current without redrawing them on every result."""

    def __init__(self, save: Callable[[Sequence[CandidateRecord]], object], min_interval_s: float = 10.0) -> None:
        """``save`` stores figures of the candidates (e.g. :func:`save_figures` on a study)."""
        self._save, self.min_interval_s = save, min_interval_s
        self._best: float | None = None
        self._last = float("-inf")

    def result(self, fitness: float, cands: Callable[[], Sequence[CandidateRecord]]) -> None:
        """A new result: redraw when it is a new best, unless the last redraw is too recent
        (then the next :meth:`flush` or best redraws)."""
        if self._best is not None and fitness <= self._best:
            return
        self._best = fitness
        if time.monotonic() - self._last < self.min_interval_s:
            return
        self.flush(cands())

    def flush(self, cands: Sequence[CandidateRecord]) -> None:
        """Redraw now (at the end of a phase)."""
        self._save(cands)
        self._last = time.monotonic()


class DashboardObserver(QuietObserver):
    """Each scored trial's note (then its held-out scores beside the search's) and the study's
    figures, written into the ledger's Optuna study, retried through transient database faults."""

    def __init__(self, ledger: Ledger, cands: Callable[[], Sequence[CandidateRecord]],
                 min_interval_s: float = 10.0) -> None:
        """``cands`` reads the study's candidates (for a redraw of the figures)."""
        self.ledger, self._cands = ledger, cands
        self.pictures = StudyPictures(lambda cs: ledger.retried(lambda: save_figures(ledger.study, cs)),
                                      min_interval_s)

    def _fitness(self, cand: CandidateRecord) -> float | None:
        # A multi-objective study's trials carry one value per task: its note shows no single fitness.
        return None if self.ledger.multi_objective else cand.fitness

    def finished(self, cand: CandidateRecord) -> None:
        """A scored trial (not a duplicate: its twin's trial has the note) gets its first note."""
        number = cand.trial_number
        if cand.state != State.COMPLETE or cand.fitness is None or cand.duplicate_of is not None or number is None:
            return
        note = trial_note(cand.scores or {}, self._fitness(cand))
        self.ledger.retried(lambda: first_trial_note(self.ledger.storage, self.ledger.study_id, number, note))
        self.pictures.result(cand.fitness, self._cands)

    def heldout_scored(self, cand: CandidateRecord) -> None:
        """Optuna freezes finished trials: held-out scores go into the search trial's note."""
        number = cand.trial_number
        if number is None or cand.heldout is None:
            return
        note = trial_note(cand.scores or {}, self._fitness(cand), cand.heldout, cand.heldout_fitness)
        self.ledger.retried(lambda: save_trial_note(self.ledger.study, self.ledger.storage, self.ledger.study_id, number, note))

    def phase_ended(self, cands: Sequence[CandidateRecord]) -> None:
        self.pictures.flush(cands)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open connection must not hold the process at exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's signature
        """No access log on stderr for every API poll."""


def serve(url: str, host: str, port: int) -> None:
    """optuna-dashboard for the storage at ``url`` on ``host:port``, one thread per request;
    blocks until interrupted."""
    from optuna_dashboard import wsgi

    app = wsgi(url)
    with make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler) as httpd:
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
