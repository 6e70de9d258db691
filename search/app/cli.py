"""``evomerge``: demo, search, plan, status, replay, dashboard, merge.

Exit status: 0 on success, 2 on bad usage or config (one line saying what and where),
1 on a runtime failure. Only this entry point sets process-wide state (logging, threads).
"""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import Any
import os
import signal
import sys
from collections.abc import Callable, Sequence

DEFAULT_STORAGE = "sqlite:///evomerge.db"
RAY_ADDRESS_ENV = "EVOMERGE_RAY_ADDRESS"  # --ray-address's default (Ray's own RAY_ADDRESS is ignored)


def _storage(args: argparse.Namespace) -> str:
    return args.storage or os.environ.get("EVOMERGE_STORAGE") or DEFAULT_STORAGE


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="SQLAlchemy URL (default: $EVOMERGE_STORAGE or sqlite:///evomerge.db); "
                                     "put passwords in the environment (e.g. PGPASSWORD), not here")


def _add_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read .bin/.pt checkpoints of sources without safetensors (torch.load with "
                        "weights_only=True); off by default: pickle files can carry code")


class _Version(argparse.Action):
    """``--version``: the installed version, read only when asked for (it costs an import)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from evomerge import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary search over model-merge recipes.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_command(sub)
    _search_command(sub)
    _plan_command(sub)
    _status_command(sub)
    _replay_command(sub)
    _merge_command(sub)
    _methods_command(sub)
    _dashboard_command(sub)
    return parser


def _demo_command(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the built-in demo end to end: search, leaderboard, replay")
    p.add_argument("--out", default="evomerge-demo", help="folder for the demo's database and model (default: %(default)s)")
    p.add_argument("--workers", type=int, help="Ray workers (default: the demo config's)")
    p.add_argument("--max-trials", type=int, help="trial budget (default: the demo config's)")
    _add_ray_address(p)
    p.add_argument("--routing", action="store_true",
                   help="also run the layer-routing demos (DFS, and PS+DFS on the PS demo's best model) "
                        "and show all three in one leaderboard")


def _search_command(sub: Any) -> None:
    p = sub.add_parser("search", help="start a search, or resume it if the study exists")
    p.add_argument("config", help="search config (YAML)")
    _add_storage(p)
    p.add_argument("--study", help="study name (default: the config's)")
    p.add_argument("--workers", type=int, help="number of Ray workers (default: the config's)")
    _add_ray_address(p)
    p.add_argument("--max-trials", type=int, help="total trial budget, counting earlier runs")
    p.add_argument("--timeout", type=float, help="stop dispatching after this many seconds")
    _add_pickle(p)


def _add_ray_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=os.environ.get(RAY_ADDRESS_ENV) or None,
                   help="join this Ray cluster instead of starting a local one (default: $EVOMERGE_RAY_ADDRESS)")


def _plan_command(sub: Any) -> None:
    p = sub.add_parser("plan", help="the memory plan of a search: where sources live, what fits per worker, "
                                    "GPU and node; exit 2 when it cannot fit")
    p.add_argument("config", help="search config (YAML)")
    p.add_argument("--gpus", type=int, help="GPUs per node to plan for (default: none, CPU workers)")
    p.add_argument("--gpu-memory", type=float, metavar="GiB", help="usable memory of one GPU (default: this "
                                                                   "machine's, from nvidia-smi)")
    p.add_argument("--host-memory", type=float, metavar="GiB", help="host memory of a node (default: this machine's)")
    p.add_argument("--workers", type=int, help="workers per node (default: the config's)")
    p.add_argument("--max-length", type=int, metavar="TOKENS",
                   help="tokens per evaluated sequence (default: the model's max length, at most 4096)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    _add_pickle(p)


def _status_command(sub: Any) -> None:
    p = sub.add_parser("status", help="print a study's leaderboard")
    _add_storage(p)
    p.add_argument("--study", help="study name (default: the only study in the storage)")
    p.add_argument("--top", type=int, default=10, help="evolved candidates shown (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def _replay_command(sub: Any) -> None:
    p = sub.add_parser("replay", help="write the best (or a named) candidate as a model folder")
    _add_storage(p)
    p.add_argument("--study", help="study name (default: the only study in the storage)")
    p.add_argument("--trial", type=int, help="the trial number that status and the dashboard show "
                                             "(default: the best by search fitness)")
    p.add_argument("--out", help="model folder to create (must not exist)")
    p.add_argument("--mergekit-yaml", metavar="PATH", help="also (or only) write the equivalent mergekit config")
    p.add_argument("--device", help="merge on this device: cpu, cuda, cuda:N (default: the device the study "
                                    "searched on, for the same bits)")
    p.add_argument("--allow-arithmetic-change", action="store_true",
                   help="replay a study searched under an older merge arithmetic anyway (its 16-bit merges differ)")
    _add_pickle(p)


def _merge_command(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge once, without a search, from an evomerge merge file or a mergekit YAML")
    p.add_argument("config", help="merge file (models + recipe) or mergekit config (merge_method, models, ...)")
    p.add_argument("--out", required=True, help="model folder to create (must not exist)")
    _add_pickle(p)


def _methods_command(sub: Any) -> None:
    p = sub.add_parser("methods", help="list the merge methods and transforms with their parameters")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def _dashboard_command(sub: Any) -> None:
    p = sub.add_parser("dashboard", help="serve optuna-dashboard on the study database")
    _add_storage(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host: the dashboard has no authentication and can delete "
                        "studies; prefer an SSH tunnel to the default 127.0.0.1")


# Commands that need no model: served by search/app/reading.py, which imports nothing heavy
# (benchmarks/cli_time.py). The others import the module that holds them, and what it needs.
READING_COMMANDS = ("status", "methods", "dashboard")
ENGINE_COMMANDS = {"search": "commands", "plan": "planning", "replay": "replaying", "merge": "replaying",
                   "demo": "demo"}
WRITES_MODELS = ("replay", "merge", "demo")  # a model folder that did not verify is a ReplayError


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    url = _storage(args) if hasattr(args, "storage") else None
    if args.command in READING_COMMANDS:
        from evomerge.search.app import reading

        return _guarded(lambda: int(getattr(reading, f"cmd_{args.command}")(args, url)), (), ())
    return _engine_command(args, url)


def _engine_command(args: argparse.Namespace, url: str | None) -> int:
    """A command that loads (part of) the engine: torch, transformers, Ray, lm-eval, Optuna."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The controller builds the lm-eval tasks to check them: no per-split bars on stderr.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars are noise in a long search's log
    from evomerge.search import signals
    from evomerge.search.app.commands import SearchFailed
    from evomerge.search.config import ConfigError
    from evomerge.search.controller import StudyMismatch
    from evomerge.evaluators.spec import TaskError
    from evomerge.workers.memory_plan import PlanError
    from evomerge.workers.source_spec import SourceError

    module = importlib.import_module(f"evomerge.search.app.{ENGINE_COMMANDS[args.command]}")
    failures: tuple[type[BaseException], ...] = (SearchFailed,)
    if args.command in WRITES_MODELS:
        from evomerge.workers.replay import ReplayError

        failures += (ReplayError,)
    if args.command in ("search", "demo"):
        signals.install()  # SIGINT/SIGTERM stop the controller at a safe point (search/signals.py)
    return _guarded(lambda: int(getattr(module, f"cmd_{args.command}")(args, url)),
                    (ConfigError, SourceError, TaskError, StudyMismatch, PlanError), failures)


def _guarded(command: Callable[[], int], usage: tuple[type[BaseException], ...],
             failure: tuple[type[BaseException], ...]) -> int:
    """Run a command; an expected error is one line on stderr: exit 2 for bad usage or input
    (``usage`` and our own), 1 for a failure at run time (``failure``, or anything else)."""
    from evomerge.search import signals
    from evomerge.search.app.reading import UsageError
    from evomerge.storage.migrations import SchemaTooNew

    try:
        return command()
    except (UsageError, SchemaTooNew, *usage) as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except failure as exc:
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
