"""The Optuna study as the trial ledger (so optuna-dashboard shows the search).

Trials are created RUNNING with their parameters fixed by our optimizer, then told.
Optuna's own samplers are not involved, and nothing is pickled: parameters, scores and
recipe summaries are plain user attributes.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from storage.engine import engine_kwargs


class Ledger:
    """One Optuna study in an RDB storage."""

    def __init__(self, url: str, study_name: str) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
        self.study = optuna.create_study(storage=self.storage, study_name=study_name,
                                         direction="maximize", load_if_exists=True)
        self.study_id = self.study._study_id
        self._heldout: optuna.Study | None = None

    def open_trial(self, params: dict[str, float], bounds: dict[str, tuple[float, float]],
                   attrs: dict[str, Any]) -> int:
        """A new RUNNING trial holding ``params``; returns its number."""
        template = create_trial(
            state=TrialState.RUNNING, params=params,
            distributions={k: FloatDistribution(*bounds[k]) for k in params}, user_attrs=attrs)
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        return self.storage.get_trial_number_from_id(trial_id)

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def set_attrs(self, number: int, attrs: dict[str, Any]) -> None:
        trial_id = self._trial_id(number)
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)

    def complete(self, number: int, value: float, attrs: dict[str, Any]) -> None:
        # A non-finite value must never be stored as COMPLETE (tell(inf) could become "best").
        if not math.isfinite(value):
            self.fail(number, f"non-finite fitness {value!r}")
            return
        self.set_attrs(number, attrs)
        self.study.tell(number, value)

    def fail(self, number: int, reason: str) -> None:
        self.set_attrs(number, {"fail_reason": reason})
        self.study.tell(number, state=TrialState.FAIL)

    def record_heldout(self, number: int, value: float, scores: dict[str, float]) -> None:
        """Add a held-out re-score to the companion study ``<study>:heldout``.

        Optuna freezes finished trials, so held-out results live in a second study whose
        trials copy the search trial's parameters: the dashboard shows both side by side.
        """
        if self._heldout is None:
            name = f"{self.study.study_name}:heldout"
            self._heldout = optuna.create_study(storage=self.storage, study_name=name, direction="maximize",
                                                load_if_exists=True)
            self.study.set_user_attr("heldout_study", name)
        source = self.storage.get_trial(self._trial_id(number))
        self._heldout.add_trial(create_trial(
            state=TrialState.COMPLETE, value=value, params=source.params, distributions=source.distributions,
            user_attrs={**source.user_attrs, "search_trial": number, "search_fitness": source.value,
                        "heldout_scores": scores}))

    def fail_running(self, reason: str) -> list[int]:
        """Fail every RUNNING trial (left by a dead controller); returns their numbers."""
        numbers = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        for number in numbers:
            self.fail(number, reason)
        return numbers
