"""Budget check for the quick start: `make demo` from a fresh clone (install included), the
cached rerun, and peak memory. Goals: <= 15 min, rerun <= 20 s, peak RSS <= 3 GB.

With ``--baseline REV`` it first times a fresh clone of REV the same way, then this commit,
back to back on the same machine (issue 24's "half the time of the commit before"), and
writes both with their ratio; compare their findings with
``quantpatch compare DIR/baseline/runs/demo DIR/head/runs/demo``.

Usage: python benchmarks/demo_budget.py [--keep DIR] [--baseline REV]
Writes benchmarks/results/demo_budget.json."""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from quantpatch._io import write_json_atomic  # noqa: E402


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True)
    return time.perf_counter() - started


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def budget(rev: str, work: Path) -> dict[str, object]:
    """`make demo` twice (fresh, then cached) in a fresh clone of ``rev``."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=work, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=work, check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    load_before = load1()
    first = timed(["make", "demo"], work)
    rerun = timed(["make", "demo"], work)
    return {"commit": commit, "clone": str(work), "make_demo_fresh_s": first,
            "make_demo_rerun_s": rerun, "load1_before": load_before, "load1_after": load1()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, help="clone here instead of a temp dir")
    parser.add_argument("--baseline", help="also time this revision first (e.g. a commit)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="quantpatch-demo-"))
    result: dict[str, object] = {}
    if args.baseline:
        result["baseline"] = budget(args.baseline, work / "baseline")
    head = budget("HEAD", work / "head" if args.baseline else work)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    result.update(head)
    result.update({"peak_rss_gib": peak_gib, "cpu_count": os.cpu_count(),
                   "goals": {"fresh_s": 900, "rerun_s": 20, "peak_rss_gib": 3}})  # fmt: skip
    if args.baseline:
        base = result["baseline"]["make_demo_fresh_s"]  # type: ignore[index]
        result["fresh_ratio_vs_baseline"] = head["make_demo_fresh_s"] / base  # type: ignore[operator]
    write_json_atomic(REPO / "benchmarks" / "results" / "demo_budget.json", result)
    if args.baseline:
        print(f"make demo at {args.baseline} (fresh clone): {base / 60:.1f} min")
    print(
        f"make demo (fresh clone, install included): {head['make_demo_fresh_s'] / 60:.1f} min  (goal <= 15)"
    )  # type: ignore[operator]  # noqa: E501
    print(
        f"make demo (rerun, cached):                 {head['make_demo_rerun_s']:.1f} s    (goal <= 20)"
    )  # noqa: E501
    print(f"peak RSS of any child process:             {peak_gib:.2f} GiB (goal <= 3)")


if __name__ == "__main__":
    main()
