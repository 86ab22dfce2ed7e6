"""Spatial ASR map throughput vs plain batched inference of the same number of images.

``quantpatch.analysis.spatial_asr_map`` pastes one patch at every position of a stride grid
into every eligible image and classifies the result; ideally that costs no more than running
the model on as many ready-made images. ``analysis.benchmark_spatial`` times both (warm-up,
then alternating runs, fastest of each); we repeat it a few times and keep the median ratio.
The patch is a seeded random one: the speed does not depend on its pixels.

Run: ``python benchmarks/spatial_throughput.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    CACHE,
    RESULTS,
    base_parser,
    bench_model,
    environment,
    load1,
    measured,
    print_table,
    setup_threads,
    wait_for_quiet,
    write_results,
)

from quantpatch.analysis import benchmark_spatial, grid_positions

GOAL = 0.8
PATCH = {"lenet": 10, "resnet20": 11}  # same patch sides as patch_speed.py
N_IMAGES = {"lenet": 200, "resnet20": 100}
STRIDE = 2


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PATCH), choices=list(PATCH))
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=None, help="benchmark_spatial calls")
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    device = torch.device(args.device)
    rounds = args.rounds or (1 if args.quick else 3)
    env = environment(device, cores=cores)
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "spatial_throughput.json")
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for name in args.models:
        model, data, acc = bench_model(name, device)
        # waited for before every model: other jobs come and go on a shared machine
        quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
        load, case_start = load1(), time.perf_counter()
        n = 32 if args.quick else N_IMAGES[name]
        images, labels = data.test.images[:n], data.test.labels[:n]
        p = PATCH[name]
        gen = torch.Generator().manual_seed(0)
        patch = torch.rand(data.in_channels, p, p, generator=gen)
        rows, cols = grid_positions(tuple(images.shape[2:]), (p, p), STRIDE)
        runs = [
            benchmark_spatial(
                model,
                patch,
                images,
                labels,
                stride=STRIDE,
                device=device,
                batch_size=args.batch_size,
                repeats=2 if args.quick else 3,
            )
            for _ in range(rounds)
        ]
        ratios = [r["throughput_ratio"] for r in runs]
        best = max(runs, key=lambda r: r["throughput_ratio"])
        row = {
            "model": name,
            "dataset": data.name,
            "clean_accuracy": acc,
            "images": n,
            "patch_size": p,
            "stride": STRIDE,
            "positions": len(rows) * len(cols),
            "batch_size": args.batch_size,
            "evaluations": int(runs[0]["evaluations"]),
            "map_images_per_s": statistics.median(r["map_images_per_s"] for r in runs),
            "plain_images_per_s": statistics.median(r["plain_images_per_s"] for r in runs),
            "throughput_ratio_median": statistics.median(ratios),
            "throughput_ratio_best": best["throughput_ratio"],
            "rounds": runs,
        }
        row["meets_goal"] = row["throughput_ratio_median"] >= GOAL
        row["measured"] = measured(load, quiet, time.perf_counter() - case_start)
        results.append(row)
        print(
            f"{name}: map {row['map_images_per_s']:.0f} img/s, plain "
            f"{row['plain_images_per_s']:.0f} img/s, ratio {row['throughput_ratio_median']:.2f}",
            flush=True,
        )
        settings = {"batch_size": args.batch_size, "rounds": rounds}
        save(
            out, env, settings, results, time.perf_counter() - start, args.merge or len(results) > 1
        )
    print_table(
        f"spatial_asr_map vs plain inference (goal: ratio >= {GOAL})",
        ["model", "evaluations", "map img/s", "plain img/s", "ratio (median)", "goal met"],
        [
            [
                r["model"],
                r["evaluations"],
                r["map_images_per_s"],
                r["plain_images_per_s"],
                r["throughput_ratio_median"],
                "yes" if r["meets_goal"] else "NO",
            ]
            for r in results
        ],
    )


def save(out: Path, env: dict, settings: dict, results: list, wall_s: float, merge: bool) -> None:
    """Written after every model, so an interrupted run keeps what it measured."""
    write_results(
        out,
        {
            "benchmark": "spatial_throughput",
            "environment": env,
            "settings": {
                **settings,
                "stride": STRIDE,
                "timing": "analysis.benchmark_spatial: warm-up, then map and plain inference "
                "alternately 3 times, fastest of each; median ratio over rounds",
                "ratio": "plain inference time / map time for the same number of images "
                "(the map's clean pass that selects eligible images counts against it)",
                "goal_ratio_min": GOAL,
            },
            "run_wall_s": wall_s,
            "results": results,
        },
        key=("model",),
        merge=merge,
    )


if __name__ == "__main__":
    main()
