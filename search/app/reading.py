"""The commands that need no model (status, methods, dashboard) and what the others share
with them: opening a storage, naming a study, building its leaderboard.

Nothing here imports torch, transformers, Ray, lm-eval or Optuna at module level, so these
commands answer in a fraction of a second (benchmarks/cli_time.py). A study's stored config
is read as plain JSON (the full config model would pull in the merge operators and lm-eval).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.search.app.leaderboard import Board, build, combine, render
from evomerge.search.names import DFS_SUFFIX, MULTI_OBJECTIVE
from evomerge.storage.engine import redacted
from evomerge.storage.repository import Repository, StudyRecord

TEXT_WIDTH = 100  # methods' text lines are wrapped to this


class UsageError(ValueError):
    """Bad usage detected after argument parsing (exit status 2)."""


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def open_repo(url: str, must_exist: bool = False) -> Repository:
    """The repository at ``url``; ``must_exist`` (reading commands): a SQLite file that is
    not there is a UsageError, not a new empty database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        if must_exist and parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
                and not parsed.query.get("uri") and not Path(parsed.database).is_file():
            raise UsageError(f"--storage {redacted(url)}: no database at {parsed.database} (nothing to read)")
        return Repository(url)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise UsageError(f"--storage {redacted(url) if '://' in url else url!r}: not a usable SQLAlchemy URL ({exc})") from None


def describe_optimizer(optimizer: Mapping[str, Any]) -> str:
    """The configured optimizer (the ``optimizer`` section of a config, as a dict) in one line."""
    extra = f", IPOP restarts <= {optimizer.get('restarts')}" if optimizer.get("name") == "cma" else ""
    popsize = optimizer.get("popsize") or "default"
    return (f"{optimizer.get('name')} (seed {optimizer.get('seed')}, popsize {popsize}, "
            f"start {optimizer.get('start')}{extra})")


def objectives_of(optimizer: str, tasks: list[str]) -> list[str]:
    """What a study's trials are scored by: the fitness, or each task (multi-objective)."""
    return list(tasks) if optimizer in MULTI_OBJECTIVE else ["fitness"]


def study_board(repo: Repository, study: StudyRecord, top: int) -> Board:
    """One study's board, naming its optimizer (and its Pareto front when multi-objective)."""
    cfg = json.loads(study.config_json)
    tasks = [t["name"] for t in cfg.get("evaluation", {}).get("tasks", [])]
    optimizer = cfg.get("optimizer", {})
    return build(study.name, repo.candidates(study.id), top, describe_optimizer(optimizer),
                 objectives_of(optimizer.get("name", ""), tasks))


def study_leaderboard(repo: Repository, name: str, ps_name: str, top: int) -> Board:
    """Study ``name``'s leaderboard; when the storage holds its DFS stage ``<name>:dfs``, one
    board over that and the PS stage ``ps_name`` (``name`` itself unless dfs.ps_study named
    another study)."""
    ps, dfs = repo.get_study(ps_name), repo.get_study(name + DFS_SUFFIX)
    if dfs is None:
        return study_board(repo, ps, top) if ps is not None else build(name, [], top)
    stages = [("ps", study_board(repo, ps, top))] if ps is not None else []
    return combine(name, [*stages, ("dfs", study_board(repo, dfs, top))])


def find_study(repo: Repository, name: str | None, url: str) -> tuple[str, int, str]:
    """(name, id, stored config JSON) of the named study, or of the only one in the storage."""
    names = repo.study_names()
    if name is None:
        # a PS+DFS search's second stage is shown with (and replayed from) its first
        firsts = [n for n in names if not (n.endswith(DFS_SUFFIX) and n.removesuffix(DFS_SUFFIX) in names)]
        if len(firsts) != 1:
            raise UsageError(f"{redacted(url)} holds {len(names)} studies {names}: name one with --study")
        name = firsts[0]
    record = repo.get_study(name)
    if record is None:
        raise UsageError(f"no study {name!r} in {redacted(url)} (studies: {names})")
    return name, record.id, record.config_json


def cmd_status(args: argparse.Namespace, url: str) -> int:
    repo = open_repo(url, must_exist=True)
    try:
        name, _, _ = find_study(repo, args.study, url)
        board = study_leaderboard(repo, name, name, args.top)
    finally:
        repo.close()
    if args.json:
        print_json(board.to_json())
    else:
        print(render(board))
    return 0


def method_entries() -> list[dict[str, Any]]:
    """Every registered merge method and transform, from their declarations (JSON-ready)."""
    from evomerge.workers.methods import METHODS, TRANSFORMS_DECLARED  # declarations: no torch

    def params(specs: tuple[Any, ...]) -> list[dict[str, Any]]:
        return [{"name": p.name, "low": p.low, "high": p.high, "default": p.default, "doc": p.doc,
                 "per_expert": p.per_expert, "searched": p.searched} for p in specs]

    entries: list[dict[str, Any]] = []
    for op in METHODS.values():
        low, high = op.experts
        entries.append({"kind": "method", "name": op.name, "doc": plain_doc(op.doc), "experts_min": low,
                        "experts_max": high, "random": op.random, "params": params(op.params)})
    for tr in TRANSFORMS_DECLARED.values():
        entries.append({"kind": "transform", "name": tr.name, "doc": plain_doc(tr.doc), "params": params(tr.params)})
    return entries


def plain_doc(doc: str) -> str:
    """A docstring's first paragraph as plain text: reST roles and literals unmarked."""
    import re

    text = " ".join(doc.split("\n\n")[0].split())
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)  # :func:`x` -> x
    return text.replace("``", "").replace("`", "")


def render_methods(entries: list[dict[str, Any]], width: int = TEXT_WIDTH) -> str:
    """Plain text, each line at most ``width`` columns."""
    out: list[str] = []
    for e in entries:
        specs = "; ".join(f"{p['name']}{'' if p['per_expert'] else ' (shared)'} [{p['low']:g}, {p['high']:g}] "
                          f"default {p['default']:g}{'' if p['searched'] else ', fixed unless given a range'}"
                          for p in e["params"]) or "no parameters"
        if e["kind"] == "method":
            low, high = e["experts_min"], e["experts_max"]
            experts = f"{low}" if low == high else f"{low}+" if high is None else f"{low}-{high}"
            facts = f"experts {experts}{', random (seeded by the recipe)' if e['random'] else ''}; {specs}"
            head = e["name"]
        else:
            facts, head = specs, f"transform {e['name']}"
        out += textwrap.wrap(f"{head}: {e['doc']}", width, subsequent_indent="    ", break_on_hyphens=False)
        out += textwrap.wrap(facts, width, initial_indent="    ", subsequent_indent="      ",
                             break_on_hyphens=False)
    return "\n".join(out)


def cmd_methods(args: argparse.Namespace, _url: str | None) -> int:
    """Every registered method and transform, from their declarations."""
    entries = method_entries()
    if getattr(args, "json", False):
        print_json(entries)
    else:
        print(render_methods(entries))
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def cmd_dashboard(args: argparse.Namespace, url: str) -> int:
    if not _loopback(args.host):
        if not args.allow_remote:
            raise UsageError(f"--host {args.host} would serve an unauthenticated dashboard that can delete "
                             "studies to the network; keep 127.0.0.1 (use an SSH tunnel) or pass --allow-remote")
        print(f"evomerge: warning: the dashboard on {args.host} has no authentication: anyone who reaches "
              "it can read and delete studies", file=sys.stderr)
    open_repo(url, must_exist=True).close()  # a URL SQLAlchemy can use, and (SQLite) a file that exists
    from evomerge.search.app.dashboard import serve  # Optuna itself: only once there is something to serve

    print(f"optuna-dashboard for {redacted(url)} on http://{args.host}:{args.port}/", file=sys.stderr)
    serve(url, args.host, args.port)  # one thread per request (run_server's is single-threaded)
    return 0
