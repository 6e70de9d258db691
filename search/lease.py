"""The study's lease: one controller drives a study at a time.

The lease is a row in the database (storage/repository.py) that the controller renews every
heartbeat; another controller takes it over only after it expires, or at once when the owner's
process is gone from this host. While it holds the lease the controller also touches the
candidates in flight, so their rows show they are alive.
"""

from __future__ import annotations

import os
import socket

from evomerge.storage.repository import Repository

LEASE_S = 120.0
HEARTBEAT_S = 5.0


def owner_alive(owner: str) -> bool:
    """Whether the process named ``host:pid`` may still run (only this host's can be checked)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # cannot tell from here: the lease's expiry decides
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


class StudyLease:
    """This process's hold on one study."""

    def __init__(self, repo: Repository, study_id: int) -> None:
        self.repo, self.study_id = repo, study_id
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._beat = 0.0

    def acquire(self) -> None:
        self.repo.acquire_lease(self.study_id, self.owner, LEASE_S, owner_alive)

    def release(self) -> None:
        self.repo.release_lease(self.study_id, self.owner)

    def heartbeat(self, running: list[int]) -> None:
        """Renew the lease and touch the ``running`` candidates, at most once per HEARTBEAT_S."""
        if self.repo.clock.now() - self._beat < HEARTBEAT_S:
            return
        self._beat = self.repo.clock.now()
        self.repo.renew_lease(self.study_id, self.owner, LEASE_S)
        self.repo.touch(running)
