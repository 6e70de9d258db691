"""Wall time of the commands that need no model, against ``python -c "import torch"``, one run.

Each round runs, in turn and as fresh processes of this venv's Python: ``import torch`` (the
baseline), ``evomerge status`` and ``status --json`` on a demo database, ``evomerge --help``,
``evomerge --version`` and ``evomerge methods``. Medians over the rounds, and each command's
ratio to the baseline (acceptance for status: under 1/3). The rounds interleave the commands,
so a machine that is busier for a while slows all of them alike.

The database: ``--storage URL``, by default a copy of tests/data/evomerge-0.1.0.db (a search
of the demo's config; upgraded to the current schema by a first, untimed status).

    python benchmarks/cli_time.py [--storage sqlite:///evomerge-demo/demo.db] [--rounds 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall_s(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="database URL (default: a copy of tests/data/evomerge-0.1.0.db)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cli-time-"))
    url = args.storage
    if url is None:
        shutil.copy(ROOT / "tests" / "data" / "evomerge-0.1.0.db", tmp / "demo.db")
        url = f"sqlite:///{tmp / 'demo.db'}"
    cli = [sys.executable, "-m", "evomerge"]
    commands = {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "evomerge status": [*cli, "status", "--storage", url],
        "evomerge status --json": [*cli, "status", "--storage", url, "--json"],
        "evomerge --help": [*cli, "--help"],
        "evomerge --version": [*cli, "--version"],
        "evomerge methods": [*cli, "methods"],
    }
    for cmd in commands.values():  # warm the file cache; the first status upgrades the copy
        wall_s(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, cmd in commands.items():
            times[name].append(wall_s(cmd))
    base = statistics.median(times['python -c "import torch"'])
    print(f"database: {url}; {args.rounds} rounds, medians (min-max)")
    print(f"{'command':<28} {'wall s':>8} {'range':>13} {'/ import torch':>15}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<28} {med:8.3f} {min(ts):6.3f}-{max(ts):<6.3f} {med / base:15.2f}")
    ratio = statistics.median(times["evomerge status"]) / base
    print(f"\nevomerge status / import torch = {ratio:.2f} ({'under' if ratio < 1 / 3 else 'NOT under'} 1/3)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
