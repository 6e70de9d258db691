"""``evomerge``: demo, search, status, replay, dashboard, merge.

Exit status: 0 on success, 2 on bad usage or config (one line saying what and where),
1 on a runtime failure. Only this entry point sets process-wide state (logging, threads).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

DEFAULT_STORAGE = "sqlite:///evomerge.db"


def _storage(args: argparse.Namespace) -> str:
    return args.storage or os.environ.get("EVOMERGE_STORAGE") or DEFAULT_STORAGE


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="SQLAlchemy URL (default: $EVOMERGE_STORAGE or sqlite:///evomerge.db); "
                                     "put passwords in the environment (e.g. PGPASSWORD), not here")


def _add_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read .bin/.pt checkpoints of sources without safetensors (torch.load with "
                        "weights_only=True); off by default: pickle files can carry code")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary search over model-merge recipes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the built-in demo end to end: search, leaderboard, replay")
    p.add_argument("--out", default="evomerge-demo", help="folder for the demo's database and model (default: %(default)s)")
    p.add_argument("--workers", type=int, help="Ray workers (default: the demo config's)")
    p.add_argument("--max-trials", type=int, help="trial budget (default: the demo config's)")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--routing", action="store_true",
                   help="also run the layer-routing demos (DFS, and PS+DFS on the PS demo's best model) "
                        "and show all three in one leaderboard")

    p = sub.add_parser("search", help="start a search, or resume it if the study exists")
    p.add_argument("config", help="search config (YAML)")
    _add_storage(p)
    p.add_argument("--study", help="study name (default: the config's)")
    p.add_argument("--workers", type=int, help="number of Ray workers (default: the config's)")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--max-trials", type=int, help="total trial budget, counting earlier runs")
    p.add_argument("--timeout", type=float, help="stop dispatching after this many seconds")
    _add_pickle(p)

    p = sub.add_parser("status", help="print a study's leaderboard")
    _add_storage(p)
    p.add_argument("--study", help="study name (default: the only study in the storage)")
    p.add_argument("--top", type=int, default=10, help="evolved candidates shown (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("replay", help="write the best (or a named) candidate as a model folder")
    _add_storage(p)
    p.add_argument("--study", help="study name (default: the only study in the storage)")
    p.add_argument("--trial", type=int, help="Optuna trial number (default: the best by search fitness)")
    p.add_argument("--out", help="model folder to create (must not exist)")
    p.add_argument("--mergekit-yaml", metavar="PATH", help="also (or only) write the equivalent mergekit config")
    _add_pickle(p)

    p = sub.add_parser("merge", help="merge once, without a search, from an evomerge merge file or a mergekit YAML")
    p.add_argument("config", help="merge file (models + recipe) or mergekit config (merge_method, models, ...)")
    p.add_argument("--out", required=True, help="model folder to create (must not exist)")
    _add_pickle(p)

    sub.add_parser("methods", help="list the merge methods and transforms with their parameters")

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on the study database")
    _add_storage(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host: the dashboard has no authentication and can delete "
                        "studies; prefer an SSH tunnel to the default 127.0.0.1")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The controller builds the lm-eval tasks to check them: no per-split bars on stderr.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars are noise in a long search's log
    from evomerge.search import commands  # heavy imports only after --help and usage checks

    from evomerge.search.commands import SearchFailed, UsageError
    from evomerge.search.config import ConfigError
    from evomerge.search.controller import StudyMismatch
    from evomerge.evaluators.tasks import TaskError
    from evomerge.workers.replay import ReplayError
    from evomerge.workers.sources import SourceError
    from evomerge.search import signals

    if args.command in ("search", "demo"):
        signals.install()  # SIGINT/SIGTERM stop the controller at a safe point (search/signals.py)
    try:
        return int(getattr(commands, f"cmd_{args.command}")(args, _storage(args) if hasattr(args, "storage") else None))
    except (ConfigError, SourceError, TaskError, StudyMismatch, UsageError) as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except (ReplayError, SearchFailed) as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        status = exc.exit_status if isinstance(exc, signals.Stopped) else 130
        what = "terminated (SIGTERM)" if status == 128 + signal.SIGTERM else "interrupted"
        print(f"evomerge: {what}; the study is saved and resumes with the same command", file=sys.stderr)
        return status
    except Exception as exc:  # one line for the user; details with EVOMERGE_DEBUG=1
        if os.environ.get("EVOMERGE_DEBUG"):
            raise
        print(f"evomerge: error: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
