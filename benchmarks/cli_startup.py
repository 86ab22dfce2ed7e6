"""Wall time of the CLI's answers that need no work: help, the schemas, a refused config.

Goal (issue 24): ``quantpatch --help``, ``run --help`` and ``schema`` within 1 s wall on an
idle machine (torch is imported only when work starts), and a validation error no slower than
importing torch. Each command runs as a fresh process (the installed ``quantpatch`` script
next to this interpreter), ``--repeats`` times interleaved; median and best, beside
``python -c "import torch"`` for reference.

Run: ``python benchmarks/cli_startup.py`` (``--quick``: 2 repeats).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    CACHE,
    RESULTS,
    base_parser,
    environment,
    load1,
    measured,
    print_table,
    write_results,
)

GOAL_S = 1.0
SCRIPT = str(Path(sys.executable).with_name("quantpatch"))
COMMANDS = {
    "quantpatch --help": [SCRIPT, "--help"],
    "quantpatch run --help": [SCRIPT, "run", "--help"],
    "quantpatch schema study": [SCRIPT, "schema", "study"],
    "quantpatch schema results": [SCRIPT, "schema", "results"],
    "quantpatch run --replicates 0 (refused by the parser)": [SCRIPT, "run", "--replicates", "0"],
    "quantpatch run bad.yaml (refused by the config)": [SCRIPT, "run", "{bad_study}"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
}
BAD_STUDY = "name: refused\nreplicates: 0\n"
"""A study file only the config's validation refuses (its registries import torch)."""


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False)
    return time.perf_counter() - started


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 7)
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "cli_startup.json")
    env = environment(torch.device("cpu"))
    bad_study = Path(tempfile.mkdtemp()) / "bad.yaml"
    bad_study.write_text(BAD_STUDY)
    commands = {name: [part.format(bad_study=bad_study) for part in command]
                for name, command in COMMANDS.items()}  # fmt: skip
    load, start = load1(), time.perf_counter()
    for command in commands.values():  # warm the file cache
        wall(command)
    runs: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            runs[name].append(wall(command))
    rows = [{"command": name, "median_s": statistics.median(t), "best_s": min(t),
             "runs_s": [round(v, 4) for v in t]} for name, t in runs.items()]  # fmt: skip
    case = {"case": "all", "rows": rows, "goal_s": GOAL_S,
            "measured": measured(load, None, time.perf_counter() - start)}  # fmt: skip
    write_results(out, {"benchmark": "cli_startup", "environment": env, "results": [case]},
                  ("case",), False)  # fmt: skip
    print_table(
        f"wall seconds per fresh process (goal <= {GOAL_S} s for help and schemas)",
        ["command", "median s", "best s"],
        [[r["command"], r["median_s"], r["best_s"]] for r in rows],
    )


if __name__ == "__main__":
    main()
