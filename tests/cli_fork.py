"""A fork server for the suite's ``evomerge`` commands: each runs in a process of its own, as
a user's would, without paying the ~3 s of imports (torch, transformers, lm-eval, Ray, Optuna)
that a fresh interpreter pays.

:func:`start` is ``subprocess.Popen([python, "-m", "evomerge", *argv], stdout=PIPE, stderr=PIPE)``
and :func:`run` is ``subprocess.run`` of the same: the command runs in a child forked from a
server process that imported the CLI and the engine once (as ``multiprocessing``'s forkserver
does), with its own cwd, environment, stdin (/dev/null), stdout and stderr (files, read when it
has ended), and exits as the interpreter does (atexit handlers run, streams flushed). Its pid is
the child's: tests signal and kill it as they would a subprocess. Nothing is started before the
fork (no Ray, no thread pool, no database): the server only imports.

A server serves the commands whose environment equals its own but for ``EVOMERGE_*``,
``PYTEST_*`` and ``PG*`` variables (which nothing imported reads at import time; servers are
started without them); a command with another environment gets a server of its own (at most
three per pytest process, started on first use, stopped by :func:`stop` at the session's end).
Every command is a plain subprocess under ``EVOMERGE_TEST_NO_FORK=1``, and tests that measure a
command's own start-up or imports (tests/test_cli_quick.py) keep plain subprocesses.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

ROOT = Path(__file__).resolve().parent.parent
# Variables read when used, never at import: commands get them, the server holds none (it is a
# descendant of the test process whose secrets tests/test_exposure.py looks for).
_AT_USE = ("EVOMERGE_", "PYTEST_", "PG")
# What the server imports before it forks: every command's module and what they load.
PRELOAD = ("evomerge.search.app.cli", "evomerge.search.app.commands", "evomerge.search.app.planning",
           "evomerge.search.app.replaying", "evomerge.search.app.demo", "evomerge.search.app.reading",
           "evomerge.workers.actor", "ray")
_POLL_S = 0.05  # how often the server reaps its children while some run


class _Server:
    """The server process, the environment it was started with, and the exit statuses it
    reported that no command has collected yet."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = _imported_env(env)
        self.proc = subprocess.Popen([sys.executable, "-c", "from tests.cli_fork import serve; serve()"], cwd=ROOT,
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.exited: dict[int, int] = {}
        self._unread = b""  # read from the server's stdout, not yet a whole message
        if self._message(time.monotonic() + 600) != {"ready": True}:
            raise RuntimeError("the evomerge fork server did not start")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def fork(self, request: dict[str, Any]) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        while True:  # exit reports of other commands may come first
            message = self._message(time.monotonic() + 120)
            if message is None:
                raise RuntimeError("the evomerge fork server did not fork")
            if "pid" in message:
                return int(message["pid"])

    def status(self, pid: int, deadline: float) -> int | None:
        """``pid``'s exit status, waiting for it until ``deadline``; None if it still runs then."""
        while pid not in self.exited:
            if self._message(deadline) is None:
                return None
        return self.exited.pop(pid)

    def _message(self, deadline: float) -> dict[str, Any] | None:
        """The server's next message (exit reports are filed in ``exited``), or None past ``deadline``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._unread:  # the pipe itself, unbuffered: a select never misses a message
            if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError("the evomerge fork server died")
            self._unread += chunk
        line, self._unread = self._unread.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        if "exited" in message:
            self.exited[int(message["exited"])] = int(message["status"])
        return message


def _imported_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of an environment that imports may read: what a server must be started with."""
    return {k: v for k, v in env.items() if not k.startswith(_AT_USE)}


# This process's servers by the environment they imported with (a test that changes another
# variable, or Ray's in-process start that sets some, gets a server of its own), oldest first.
_servers: dict[tuple[tuple[str, str], ...], _Server] = {}
_MAX_SERVERS = 3


class Command:
    """A forked ``evomerge`` command, used as a :class:`subprocess.Popen` with stdout and stderr pipes."""

    def __init__(self, server: _Server, argv: Sequence[str], cwd: Path, env: Mapping[str, str], text: bool) -> None:
        self.args = [sys.executable, "-m", "evomerge", *argv]
        self._server, self._text = server, text
        self._folder = Path(tempfile.mkdtemp(prefix="evomerge-cli-"))
        self.pid = server.fork({"argv": list(argv), "cwd": str(cwd), "env": dict(env),
                                "stdout": str(self._folder / "stdout"), "stderr": str(self._folder / "stderr")})
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.status(self.pid, time.monotonic())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            deadline = time.monotonic() + (timeout if timeout is not None else 10 ** 9)
            self.returncode = self._server.status(self.pid, deadline)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        """Wait for the command, then its stdout and stderr (str or bytes as asked)."""
        self.wait(timeout)
        out = [(self._folder / name).read_bytes() for name in ("stdout", "stderr")]
        shutil.rmtree(self._folder, ignore_errors=True)
        if self._text:
            return out[0].decode(errors="replace"), out[1].decode(errors="replace")
        return out[0], out[1]

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Running = Union["Command", "subprocess.Popen[Any]"]  # what start() returns


def start(argv: Sequence[str], cwd: Path, env: Mapping[str, str], text: bool = False) -> Running:
    """``python -m evomerge *argv`` in ``cwd`` with ``env``, running: forked from a server of
    ``env``, or a plain subprocess under EVOMERGE_TEST_NO_FORK=1 (stdout and stderr piped either way)."""
    if os.environ.get("EVOMERGE_TEST_NO_FORK") != "1":
        return Command(_server_for(env), argv, cwd, env, text)
    return subprocess.Popen([sys.executable, "-m", "evomerge", *argv], cwd=cwd, env=dict(env), text=text,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(argv: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` of ``python -m evomerge *argv`` (output captured as text, killed past ``timeout``)."""
    command = start(argv, cwd, env, text=True)
    try:
        out, err = command.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        command.kill()
        command.communicate()
        raise
    assert command.returncode is not None
    return subprocess.CompletedProcess(command.args, command.returncode, out, err)


def stop() -> None:
    """Stop this process's servers (their commands have all ended)."""
    while _servers:
        _servers.pop(next(iter(_servers))).close()


def _server_for(env: Mapping[str, str]) -> _Server:
    """The running server started with ``env``'s imported part; a new one (the oldest of too
    many stopped) where there is none."""
    key = tuple(sorted(_imported_env(env).items()))
    server = _servers.get(key)
    if server is None or server.proc.poll() is not None:
        if len(_servers) >= _MAX_SERVERS:
            _servers.pop(next(iter(_servers))).close()
        server = _servers[key] = _Server(env)
    return server


def serve() -> None:
    """The server: import, say ready, then fork a child per request and report each child's
    exit status, until its stdin closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    _say({"ready": True})
    pending, running = b"", 0
    while True:
        readable = select.select([0], [], [], _POLL_S if running else None)[0]
        if readable:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    _child(json.loads(line))  # never returns
                running += 1
                _say({"pid": pid})
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running -= 1
            _say({"exited": pid, "status": os.waitstatus_to_exitcode(status)})


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def _child(request: dict[str, Any]) -> None:
    """In the forked child: the request's cwd, environment and files, then the CLI; exits."""
    status: object = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = [str(a) for a in request["argv"]]
        sys.argv = ["evomerge", *argv]
        from evomerge.search.app.cli import main

        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    # The end of `python -m evomerge`: its atexit handlers (Ray's, logging's, weakref finalizers'),
    # the streams flushed, the exit status. Not the teardown of every module's objects, which
    # costs ~1.2 s with torch loaded and writes nothing.
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    code = status if isinstance(status, int) else 0 if status is None else 1
    if not isinstance(status, (int, type(None))):
        print(status, file=sys.stderr, flush=True)  # as SystemExit("message") prints it
    os._exit(code)
