"""The table of examples/real-hard's searches: for each stored study, its best-by-search
recipe on the held-out split against the best source, the best untuned merge and the
leave-one-out probes, in binomial standard deviations.

    python examples/real-hard/searches.py sqlite:///realhard/s0.db sqlite:///realhard/s1.db ...

Reads what ``evomerge status --json`` prints (held-out scores are the search's own held-out
re-scoring). ``--study`` names the study in each storage (default: real-hard).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from typing import Any

Row = dict[str, Any]


def status(url: str, study: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "evomerge", "status", "--storage", url, "--study", study, "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def heldout(row: Row) -> float:
    value = row.get("heldout_fitness")
    if value is None:
        raise SystemExit(f"trial {row['trial']} has no held-out score: did the search finish its re-scoring?")
    return float(value)


def best(rows: list[Row], keep: Any) -> Row:
    return max((r for r in rows if keep(r) and r.get("heldout_fitness") is not None), key=heldout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("storages", nargs="+", help="SQLAlchemy URLs, one search each")
    parser.add_argument("--study", default="real-hard")
    parser.add_argument("--heldout-docs", type=int, default=200, help="held-out documents per task")
    args = parser.parse_args()
    print("| search | best by search fitness | search | held-out | vs best source | vs best untuned merge "
          "| vs best leave-one-out probe | evaluations per family |\n|---|---|---|---|---|---|---|---|")
    for url in args.storages:
        d = status(url, args.study)
        top = d["rows"][0]
        tasks = len(top["heldout"])
        sigma = math.sqrt(tasks * 0.25 / args.heldout_docs) / tasks  # of one held-out mean, at p = 0.5
        source = best(d["baselines"], lambda r: r["origin"] == "source")
        untuned = best(d["baselines"], lambda r: r["origin"] == "untuned" and " without " not in r["recipe"]["label"])
        probe = best(d["baselines"], lambda r: " without " in r["recipe"]["label"])
        gaps = [f"{heldout(top) - heldout(r):+.3f} ({(heldout(top) - heldout(r)) / sigma:+.1f} σ)"
                for r in (source, untuned, probe)]
        families = ", ".join(f"{f['family']} {f['evaluations']}" for f in d["families"])
        seed = re.search(r"seed (\d+)", d["optimizer"])
        print(f"| seed {seed.group(1) if seed else '?'} | {top['summary'][:90]} | {top['fitness']:.3f} | "
              f"**{heldout(top):.3f}** | " + " | ".join(gaps) + f" | {families} |")
    print(f"\nσ of one held-out mean ≤ sqrt(T·0.25/n)/T = {sigma:.4f} (T = {tasks} tasks, n = "
          f"{args.heldout_docs} words); a difference of two such means has σ·√2 = {sigma * math.sqrt(2):.4f}.")
    print(f"Best source: {source['summary']} {heldout(source):.3f}; best untuned merge: "
          f"{untuned['recipe']['label']} {heldout(untuned):.3f}; best probe: {probe['recipe']['label']} "
          f"{heldout(probe):.3f} (the last study's baselines; every study scores the same ones).")


if __name__ == "__main__":
    main()
