"""The one module that writes optuna-dashboard's trial notes, whose storage format is not a
public API of optuna-dashboard.

A note is a study system attribute ``dashboard:<trial id>:note_ver`` (its version) and the
body in chunks ``dashboard:<trial id>:note_str:<i>`` of at most 2045 characters. The first
note of a trial is written here directly (optuna-dashboard's ``save_note`` reads every system
attribute of the study twice, ~50 ms a trial at 300 trials); later ones go through
``save_note``. tests/test_dependency_internals.py compares these keys and the chunk length
with the installed optuna-dashboard, and the browser test reads such a note off the rendered
page (tests/test_dashboard_browser.py).
"""

from __future__ import annotations

import optuna
from optuna.storages import BaseStorage

NOTE_CHUNK = 2045  # optuna-dashboard's longest system attribute string


def note_keys(trial_id: int) -> tuple[str, str]:
    """A trial note's version key and the prefix of its chunks' keys."""
    return f"dashboard:{trial_id}:note_ver", f"dashboard:{trial_id}:note_str:"


def first_trial_note(storage: BaseStorage, study_id: int, number: int, body: str) -> None:
    """Write the first note of a new trial (version 1): it has neither a version nor chunks yet."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    version, chunk = note_keys(trial_id)
    storage.set_study_system_attr(study_id, version, 1)
    for i in range(0, max(len(body), 1), NOTE_CHUNK):
        storage.set_study_system_attr(study_id, f"{chunk}{i // NOTE_CHUNK}", body[i:i + NOTE_CHUNK])


def save_trial_note(study: optuna.Study, storage: BaseStorage, study_id: int, number: int, body: str) -> None:
    """Write ``body`` as trial ``number``'s note (replacing the previous one), finished or not."""
    from optuna_dashboard import save_note

    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    # save_note takes a live Trial; building one only reads the trial (the ledger's study
    # has no sampler of its own at work: parameters come from our optimizer).
    save_note(optuna.trial.Trial(study, trial_id), body)
