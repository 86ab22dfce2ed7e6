"""Budget check for the quick start: `make demo` from a fresh clone (install included), the
cached rerun, and peak memory. Goals: <= 15 min, rerun <= 20 s, peak RSS <= 3 GB.

Usage: python benchmarks/demo_budget.py [--keep DIR]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, help="clone here instead of a temp dir")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="quantpatch-demo-"))
    subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
    first = timed(["make", "demo"], work)
    rerun = timed(["make", "demo"], work)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    result = {
        "make_demo_fresh_s": first,
        "make_demo_rerun_s": rerun,
        "peak_rss_gib": peak_gib,
        "goals": {"fresh_s": 900, "rerun_s": 20, "peak_rss_gib": 3},
        "cpu_count": os.cpu_count(),
        "clone": str(work),
    }
    write_json_atomic(REPO / "benchmarks" / "results" / "demo_budget.json", result)
    print(f"make demo (fresh clone, install included): {first / 60:.1f} min  (goal <= 15)")
    print(f"make demo (rerun, cached):                 {rerun:.1f} s    (goal <= 20)")
    print(f"peak RSS of any child process:             {peak_gib:.2f} GiB (goal <= 3)")


if __name__ == "__main__":
    main()
