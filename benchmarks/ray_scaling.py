"""What running a study on Ray costs and gains: overhead per task, cells/hour, N-node estimate.

1. Per-task overhead: the round trip of an empty Ray task (submit, schedule, return), and one
   tiny cell computed in this process against the same cell as a Ray task (cold: the worker
   first rebuilds the study's context; warm: it reuses it). The cell's patch is cached after
   the first fit, so every timed call does the same work.
2. Cells/hour of the cell stage of a small study with its models already cached: local (this
   process) and Ray with 1 and 2 worker processes (a local cluster whose nodes offer one CPU
   each: a head, then a second node).
3. A scaling estimate for N workers (GPU nodes, say) from the recorded per-cell times of a
   study's records (``study.executors.estimate_scaling``): this run's, or ``--results`` of
   any study, e.g. one run on a GPU node.

Run: ``python benchmarks/ray_scaling.py`` (``--quick`` for a smoke test). Needs Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import ray
import ray.cluster_utils
import torch
from _common import (
    CACHE,
    RESULTS,
    base_parser,
    environment,
    load1,
    measured,
    print_table,
    summary,
    wait_for_quiet,
    write_results,
)

from quantpatch.results import CellRecord
from quantpatch.study import load_study, run_study
from quantpatch.study.grid.cells import expand_cells
from quantpatch.study.grid.scoring import run_cell
from quantpatch.study.run.executors import estimate_scaling
from quantpatch.study.run.ray_executor import cell_task, task_payload
from quantpatch.study.run.runner import prepare

WORKERS = (1, 2)
NODES = (1, 2, 4, 8, 16)
NODE_CPUS = 1
"""Each Ray node offers one CPU, so a node is one worker process (as a one-GPU node would be)."""


def study_settings(quick: bool) -> dict[str, Any]:
    """A small study (lenet, two precisions, universal and random patches, no analyses):
    enough cells to keep two workers busy, small enough for a 2-core machine."""
    return {
        "name": "ray-scaling",
        "limit": 600 if quick else 2000,
        "n_eval": 50 if quick else 200,
        "models": ["lenet"],
        "precisions": ["fp32", "w8a8", "w4a4"],
        "deployments": [],
        "controls": False,
        "attacks": [
            {"name": "universal", "params": {"steps": 5 if quick else 40, "batch_size": 32}},
            {"name": "random"},
        ],
        "patch_sizes": [8],
        "seeds": [0, 1] if quick else [0, 1, 2, 3],
        "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
        "qat": {"epochs": 1, "lr": 0.01},
        "qat_overrides": {},
        "analyses": {
            key: False
            for key in ("gradient_alignment", "features", "spatial", "size_curve", "quant_strength")
        },
        "device": "cpu",
    }


class LocalCluster:
    """A Ray cluster on 127.0.0.1 with ``workers`` one-CPU nodes; workers import this code."""

    def __init__(self, workers: int) -> None:
        source = str(Path(__file__).resolve().parents[1] / "src")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (source, os.environ.get("PYTHONPATH")) if p
        )
        head = {"num_cpus": NODE_CPUS, "include_dashboard": False}
        self.cluster = ray.cluster_utils.Cluster(initialize_head=True, head_node_args=head)
        for _ in range(workers - 1):
            self.cluster.add_node(num_cpus=NODE_CPUS)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, logging_level="WARNING")

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *_: object) -> None:
        ray.shutdown()
        self.cluster.shutdown()


def overhead(settings: dict[str, Any], work: Path, repeats: int) -> dict[str, Any]:
    """Empty-task round trip, and one tiny cell here vs as a Ray task (cold, then warm)."""
    config = load_study(**settings, cache_dir=work / "cache")
    context = prepare(config, work / "overhead", progress=False)
    cell = next(c for c in expand_cells(context) if c.attack.name == "universal")
    run_cell(context, cell)  # fits and caches the patch: every timed call below loads it
    local = [_timed(lambda: run_cell(context, cell)) for _ in range(repeats)]
    with LocalCluster(1):
        noop = ray.remote(_noop).options(num_cpus=1)
        ray.get(noop.remote())  # a worker is up
        empty = [_timed(lambda: ray.get(noop.remote())) for _ in range(repeats)]
        task = ray.remote(cell_task).options(num_cpus=1)
        args = (*task_payload(context), cell.key)
        cold = _timed(lambda: ray.get(task.remote(*args)))
        warm = [_timed(lambda: ray.get(task.remote(*args))) for _ in range(repeats)]
    return {
        "empty_task": summary(empty),
        "cell_local": summary(local),
        "cell_ray_cold_s": cold,
        "cell_ray_warm": summary(warm),
        "ray_overhead_per_cell_s": statistics.median(warm) - statistics.median(local),
        "cell": cell.cell_id,
    }


def _noop() -> None:
    return None


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def throughput(
    settings: dict[str, Any], work: Path, executor: str, workers: int
) -> tuple[dict[str, Any], Path]:
    """Wall time and cells/hour of a fresh run folder whose models are cached (patches not)."""
    cache = work / f"cache-{executor}-{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.copytree(work / "cache" / "models", cache / "models")
    out = work / f"run-{executor}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    config = load_study(**settings, cache_dir=cache, executor=executor)
    if executor == "ray":
        with LocalCluster(workers):
            wall = _timed(lambda: run_study(config, out, progress=False))
    else:
        wall = _timed(lambda: run_study(config, out, progress=False))
    cells = len(list((out / "cells").glob("*.json")))
    row = {"executor": executor, "workers": workers, "cells": cells, "wall_s": wall}
    return {**row, "cells_per_hour": 3600 * cells / wall}, out / "results.json"


def estimates(results: Path, serial_s: float) -> list[dict[str, Any]]:
    """Bounds on the cell stage (plus ``serial_s``) on each of ``NODES`` workers."""
    records = [CellRecord.model_validate(c) for c in json.loads(results.read_text())["cells"]]
    rows = []
    for nodes in NODES:
        bound = estimate_scaling(records, nodes, serial_s)
        rows.append({"workers": nodes, "lower_s": bound.lower_s, "upper_s": bound.upper_s})
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="estimate from this study's results.json")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or NODE_CPUS)  # as each Ray worker (OMP_NUM_THREADS)
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
    settings = study_settings(args.quick)
    repeats = args.repeats or (3 if args.quick else 5)
    work = CACHE / "ray-scaling"
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "ray_scaling.json")
    env = environment(torch.device("cpu"), ray=ray.__version__, node_cpus=NODE_CPUS)
    load, start = load1(), time.perf_counter()
    # the models, trained once, here: each measurement below copies them into a fresh cache
    prep = _timed(lambda: prepare(load_study(**settings, cache_dir=work / "cache"),
                                  work / "prepare", progress=False))  # fmt: skip
    rows = [overhead(settings, work, repeats)]
    runs = [throughput(settings, work, "local", 1)]
    runs += [throughput(settings, work, "ray", n) for n in WORKERS]
    row = {"quick": args.quick, "study": settings, "models_prepare_s": prep, "overhead": rows[0]}
    row["throughput"] = [r for r, _ in runs]
    row["estimate"] = estimates(args.results or runs[-1][1], serial_s=0.0 if args.results else prep)
    row["estimate_from"] = str(args.results or "this run's 2-worker records")
    row["measured"] = measured(load, quiet, time.perf_counter() - start)
    report(row)
    data = {"benchmark": "ray_scaling", "environment": env, "results": [row]}
    write_results(out, data, ["estimate_from"], args.merge)


def report(row: dict[str, Any]) -> None:
    o = row["overhead"]
    print_table(
        "per-task overhead (s, median)",
        ["empty task", "cell local", "cell ray cold", "cell ray warm", "overhead/cell"],
        [[o["empty_task"]["median_s"], o["cell_local"]["median_s"], o["cell_ray_cold_s"],
          o["cell_ray_warm"]["median_s"], o["ray_overhead_per_cell_s"]]],
    )  # fmt: skip
    print_table(
        "cell stage, models cached",
        ["executor", "workers", "cells", "wall s", "cells/hour"],
        [[r["executor"], r["workers"], r["cells"], r["wall_s"], r["cells_per_hour"]]
         for r in row["throughput"]],
    )  # fmt: skip
    print_table(
        f"estimate on N workers ({row['estimate_from']})",
        ["workers", "lower s", "upper s"],
        [[r["workers"], r["lower_s"], r["upper_s"]] for r in row["estimate"]],
    )


if __name__ == "__main__":
    main()
