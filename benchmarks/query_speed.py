"""Sparse-RS query throughput vs plain inference of the same batches (ORT int8, torch fp32).

A query attack should cost little more than the forward passes it asks for. ``sparse-rs``
runs on a batch of test images with a fixed budget; every forward it makes is recorded (the
batch shrinks as images succeed), and "plain" replays exactly those batch sizes on ready-made
images through the same model. The ratio (plain time / attack time, i.e. attack queries/s
over plain images/s) is the attack's efficiency; the goal is at least 0.8. The same is done
on the ONNX Runtime int8 session of the model and on the torch fp32 model itself; plain
full-batch throughput is reported alongside for reference.

Each case runs with one candidate per image per forward (the paper's search) and with several
(``--candidates``): a (1 + k) search that spends the same budget in k-times larger, fewer
forwards, so the attack's per-iteration work (proposals, pastes, scores) is amortised; the
images fooled within the budget are recorded for both, since the search changes.

Run: ``python benchmarks/query_speed.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import (
    CACHE,
    RESULTS,
    base_parser,
    bench_model,
    environment,
    interleaved,
    load1,
    measured,
    print_table,
    setup_threads,
    summary,
    wait_for_quiet,
    write_results,
)

from quantpatch.attacks import create_attack
from quantpatch.quant.onnx import OrtModel, export_onnx, quantize_onnx_int8

GOAL = 0.8
PATCH = {"lenet": 10, "resnet20": 11}  # same patch sides as patch_speed.py
N_IMAGES = 256  # the attack's batch: every query of one iteration in one forward
QUERIES = 200
CALIBRATION = 256  # training images for the int8 calibration


class Recorder:
    """Passes queries through to ``model`` and notes each forward's batch size."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.model, self.sizes = model, []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(images))
        return self.model(images)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PATCH), choices=list(PATCH))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--candidates", nargs="+", type=int, default=[1, 4])
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 5)
    n, queries = (64, 50) if args.quick else (N_IMAGES, QUERIES)
    env = environment(device, cores=cores)
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "query_speed.json")
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for name in args.models:
        model, data, acc = bench_model(name, device)
        images, labels = data.test.images[:n], data.test.labels[:n]
        with tempfile.TemporaryDirectory(prefix="quantpatch-query-") as work:
            fp32 = export_onnx(model, Path(work) / "fp32.onnx", images[:2])
            int8 = quantize_onnx_int8(
                fp32, Path(work) / "int8.onnx", data.train.images[:CALIBRATION]
            )
            runtimes = {"ort-int8": OrtModel(int8, batch_size=n), "torch-fp32": model}
            for runtime, target in runtimes.items():
                for k in args.candidates:
                    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
                    load, case_start = load1(), time.perf_counter()
                    row = {"model": name, "runtime": runtime, "candidates": k}
                    row |= {"threads": torch.get_num_threads(), "dataset": data.name}
                    row["clean_accuracy"] = acc
                    row |= case(target, images, labels, (PATCH[name], queries, k), device,
                                repeats)  # fmt: skip
                    row["measured"] = measured(load, quiet, time.perf_counter() - case_start)
                    results.append(row)
                    save(out, env, repeats, results, time.perf_counter() - start,
                         args.merge or len(results) > 1)  # fmt: skip
    report(results)


def case(
    target: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    search: tuple[int, int, int],
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """Time the attack (``search`` = patch side, query budget, candidates per forward) and the
    plain replay of its batches, interleaved."""
    patch, queries, k = search
    attack = create_attack(
        "sparse-rs", patch_size=patch, queries=queries, candidates=k, batch_size=len(images),
        progress=False,
    )  # fmt: skip
    recorder = Recorder(target)
    attack.perturb([recorder], images, labels, device)  # warm-up, and the batch sizes
    used = int(attack.queries_used.sum())
    pool = images.to(device)
    plain_model = plain(target)

    def run_attack(_: int) -> None:
        attack.perturb([target], images, labels, device)

    def run_plain(_: int) -> None:
        for size in recorder.sizes:
            plain_model(pool[:size])

    def run_full(_: int) -> None:
        plain_model(pool)

    times = interleaved({"attack": run_attack, "plain": run_plain, "full": run_full},
                        repeats, device)  # fmt: skip
    ratios = [p / a for p, a in zip(times["plain"], times["attack"], strict=True)]
    fooled = int((attack.queries_used < queries).sum())
    return {
        "images": len(images),
        "queries_budget": queries,
        "patch_size": patch,
        "queries_used": used,
        "forwards": len(recorder.sizes),
        "stopped_at_success": fooled,
        "attack_queries_per_s": used / min(times["attack"]),
        "plain_images_per_s": used / min(times["plain"]),
        "full_batch_images_per_s": len(images) / min(times["full"]),
        "throughput_ratio_median": statistics.median(ratios),
        "throughput_ratio_best": max(ratios),
        "meets_goal": statistics.median(ratios) >= GOAL,
        "attack": summary(times["attack"]),
        "plain": summary(times["plain"]),
        "full": summary(times["full"]),
    }


def plain(target: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], Any]:
    """The model called the plain way: a module under inference mode, a session as is."""
    if not isinstance(target, torch.nn.Module):
        return target

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return target(x)

    return run


def report(results: list[dict[str, Any]]) -> None:
    print_table(
        f"sparse-rs queries/s vs plain inference of the same batches (goal >= {GOAL})",
        ["model", "runtime", "candidates", "queries", "forwards", "fooled", "attack q/s",
         "plain img/s", "full-batch img/s", "ratio (median)", "goal met"],
        [
            [r["model"], r["runtime"], r["candidates"], r["queries_used"], r["forwards"],
             f"{r['stopped_at_success']}/{r['images']}",
             r["attack_queries_per_s"], r["plain_images_per_s"], r["full_batch_images_per_s"],
             r["throughput_ratio_median"], "yes" if r["meets_goal"] else "NO"]
            for r in results
        ],
    )  # fmt: skip


def save(out: Path, env: dict, repeats: int, results: list, wall_s: float, merge: bool) -> None:
    """Written after every case, so an interrupted run keeps what it measured."""
    write_results(
        out,
        {
            "benchmark": "query_speed",
            "environment": env,
            "settings": {
                "repeats": repeats,
                "attack": "sparse-rs, untargeted, seed 0, every image of the batch attacked "
                "together; 'candidates' proposals per image in each forward",
                "timing": "warm-up run records the batch size of every forward; then attack, "
                "plain replay of those batch sizes on ready-made images, and one full-batch "
                "plain forward, interleaved; best of the repeats for the rates",
                "ratio": "plain replay time / attack time (= attack queries/s over plain "
                "images/s for the same forwards)",
                "goal_ratio_min": GOAL,
            },
            "run_wall_s": wall_s,
            "results": results,
        },
        key=("model", "runtime", "candidates", "threads"),
        merge=merge,
    )


if __name__ == "__main__":
    main()
