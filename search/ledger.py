"""The Optuna study as the trial ledger (so optuna-dashboard shows the search).

Trials are created RUNNING with their parameters fixed by our optimizer, then told.
Optuna's own samplers are not involved, and nothing is pickled: parameters, scores and
recipe summaries are plain user attributes.

What the dashboard shows beyond Optuna's columns (a note of per-task and held-out scores on
each trial, the study's figures) is the application's: an observer of the controller writes it
into this ledger's study (search/app/dashboard.py), through :meth:`Ledger.retried`.

Our candidate table is the truth; this ledger follows it. The controller records an
outcome there first, then tells Optuna, so a stop between the two leaves a RUNNING trial
whose candidate is settled: :meth:`Ledger.settle_running` tells it what the candidate
says on the next start (Optuna freezes finished trials, so the order matters). Every
operation is retried through transient database faults and may be repeated safely.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from evomerge.storage.clock import Clock
from evomerge.storage.engine import engine_kwargs
from evomerge.storage.retry import patience_s, retrying

T = TypeVar("T")


class Ledger:
    """One Optuna study in an RDB storage."""

    def __init__(self, url: str, study_name: str, objectives: Sequence[str] = ("fitness",),
                 patience: float | None = None, clock: Clock | None = None) -> None:
        """``objectives`` name what each trial's values are (one per task for a multi-objective
        search): the dashboard shows these names and, for several, the Pareto front.
        ``patience`` and ``clock`` bound the retries as the repository's do (storage/retry.py)."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url, self.patience_s, self.clock = url, patience_s() if patience is None else patience, clock
        self.storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url, self.patience_s))
        self.study = self.retried(lambda: optuna.create_study(
            storage=self.storage, study_name=study_name, directions=["maximize"] * len(objectives),
            load_if_exists=True))
        if self.study.metric_names is None:
            with warnings.catch_warnings():  # experimental in Optuna, stable in use since 3.2
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.retried(lambda: self.study.set_metric_names(list(objectives)))
        self.study_id = self.retried(lambda: self.storage.get_study_id_from_name(study_name))

    @staticmethod
    def exists(url: str, study_name: str) -> bool:
        """Whether ``study_name`` is an Optuna study in the storage at ``url``."""
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
        try:
            storage.get_study_id_from_name(study_name)
        except KeyError:
            return False
        finally:
            storage.remove_session()
        return True

    def retried(self, work: Callable[[], T]) -> T:
        """``work`` on this ledger's storage, retried through transient database faults."""
        return retrying(work, self.url, self.patience_s, self.clock)

    @property
    def multi_objective(self) -> bool:
        return len(self.study.directions) > 1

    def open_trial(self, params: dict[str, float], bounds: dict[str, tuple[float, float]],
                   attrs: dict[str, Any]) -> int:
        """A new RUNNING trial holding ``params``; returns its number."""
        template = create_trial(
            state=TrialState.RUNNING, params=params,
            distributions={k: FloatDistribution(*bounds[k]) for k in params}, user_attrs=attrs)
        return self.retried(lambda: self.storage.get_trial_number_from_id(
            self.storage.create_new_trial(self.study_id, template_trial=template)))

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def set_attrs(self, number: int, attrs: dict[str, Any]) -> None:
        self.retried(lambda: self._set_attrs(number, attrs))

    def _set_attrs(self, number: int, attrs: dict[str, Any]) -> None:
        trial_id = self._trial_id(number)
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)

    def complete(self, number: int, values: Sequence[float], attrs: dict[str, Any]) -> None:
        """Finish trial ``number`` with its objective values (one per objective); a no-op if
        it is already finished."""
        # A non-finite value must never be stored as COMPLETE (tell(inf) could become "best").
        if not all(math.isfinite(v) for v in values):
            self.fail(number, f"non-finite objective values {list(values)!r}")
            return

        def tell() -> None:
            if not self._finished(number):  # a retry after a lost acknowledgement finds it told
                self._set_attrs(number, attrs)
                self.study.tell(number, list(values) if len(values) > 1 else values[0], skip_if_finished=True)

        self.retried(tell)

    def fail(self, number: int, reason: str) -> None:
        """Fail trial ``number`` with ``reason``; a no-op if it is already finished."""

        def tell() -> None:
            if not self._finished(number):
                self._set_attrs(number, {"fail_reason": reason})
                self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

        self.retried(tell)

    def _finished(self, number: int) -> bool:
        return self.storage.get_trial(self._trial_id(number)).state.is_finished()

    def settle_running(self, verdict: Callable[[int], Sequence[float] | str]) -> list[int]:
        """Finish every RUNNING trial (left by a stopped controller) as our table says:
        ``verdict(number)`` is its candidate's stored objective values (COMPLETE) or a reason
        (FAIL). Returns the numbers settled."""
        numbers = self.retried(lambda: [t.number for t in self.study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING,))])
        for number in numbers:
            outcome = verdict(number)
            if isinstance(outcome, str):
                self.fail(number, outcome)
            else:
                self.complete(number, outcome, {"reconciled": "completed before the controller stopped"})
        return numbers
