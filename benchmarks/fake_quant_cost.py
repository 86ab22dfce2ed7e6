"""Cost of fake quantization: forward+backward w.r.t. the input, w4a4 vs fp32, every model.

Attacks on quantized models differentiate through the fake-quant ops on every step, so their
overhead bounds how much slower an attack on w4a4 is than on fp32. Each model is built for
28x28x1 input (random weights: speed does not depend on them), quantized with
``quantpatch.quant.quantize`` and calibrated (min/max) so the cheap frozen-scale op is used,
then both precisions run the same loop in eval mode with frozen parameters, interleaved.

The same pair is timed a second time as attacks run it: ``Attack.frozen_copies`` (BatchNorm
folded, channels-last, fake-quantized weights quantized once, since attacks never change
weights), so the ratio an attack pays sits beside the bare models' one.

Run: ``python benchmarks/fake_quant_cost.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    CACHE,
    RESULTS,
    base_parser,
    environment,
    interleaved,
    load1,
    measured,
    mnist,
    print_table,
    setup_threads,
    wait_for_quiet,
    write_results,
)
from torch import nn

from quantpatch.attacks import create_attack
from quantpatch.models import MODELS, create_model
from quantpatch.quant import FP32, QuantSpec, calibrate, quantize

GOAL = 1.15  # issue 24: w4a4/fp32 forward + backward on every zoo model
BATCH = 128


def build(name: str, images: torch.Tensor, device: torch.device) -> dict[str, nn.Module]:
    """fp32 and calibrated w4a4 versions of ``name`` (same weights), eval mode, frozen; then
    the attack's frozen copies of both (``PAIRS``)."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10, image_size=28).to(device).eval()
    w4a4 = quantize(model, QuantSpec.parse("w4a4"))
    calibrate(w4a4, images, "minmax", device)
    bare = {
        FP32.name: model.requires_grad_(False),
        "w4a4": w4a4.to(device).eval().requires_grad_(False),
    }
    copies = create_attack("patch-pgd", patch_size=5).frozen_copies(list(bare.values()), device)
    return {**bare, **{f"{k} attack copy": m for k, m in zip(bare, copies, strict=True)}}


PAIRS = {"": ("fp32", "w4a4"), "_attack_copy": ("fp32 attack copy", "w4a4 attack copy")}
"""Ratio key suffix -> (fp32, w4a4) models: as built, and as an attack runs them."""


def fwd_bwd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int) -> None:
    for _ in range(iters):
        torch.autograd.grad(F.cross_entropy(model(x), y), x)


def calibrate_iters(model: nn.Module, x, y, target_s: float) -> int:
    """Iterations per timed call so that one call lasts about ``target_s`` (>= 1)."""
    start = time.perf_counter()
    fwd_bwd(model, x, y, 1)
    one = time.perf_counter() - start
    return max(1, round(target_s / max(one, 1e-6)))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS.names(), choices=MODELS.names())
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 7)
    target_s = 0.1 if args.quick else 1.0
    env = environment(device, cores=cores)
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "fake_quant_cost.json")
    data = mnist()
    calib = data.train.images[:256]
    x = data.train.images[:BATCH].to(device).requires_grad_(True)
    y = data.train.labels[:BATCH].to(device)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for name in args.models:
        # waited for before every model: other jobs come and go on a shared machine
        quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
        load, case_start = load1(), time.perf_counter()
        models = build(name, calib, device)
        for m in models.values():  # warm-up
            fwd_bwd(m, x, y, 2)
        iters = calibrate_iters(models[FP32.name], x, y, target_s)
        times = interleaved(
            {k: (lambda _r, m=m, n=iters: fwd_bwd(m, x, y, n)) for k, m in models.items()},
            repeats,
            device,
        )
        row: dict[str, Any] = {"model": name, "iters_per_run": iters}
        for k, runs in times.items():
            per = [t / iters for t in runs]
            row[k] = {
                "median_ms": 1000 * statistics.median(per),
                "best_ms": 1000 * min(per),
                "runs_ms": [round(1000 * t, 3) for t in per],
            }
        for suffix, (fp32, w4a4) in PAIRS.items():
            row[f"ratio_median{suffix}"] = row[w4a4]["median_ms"] / row[fp32]["median_ms"]
            row[f"ratio_best{suffix}"] = row[w4a4]["best_ms"] / row[fp32]["best_ms"]
            row[f"meets_goal{suffix}"] = row[f"ratio_median{suffix}"] <= GOAL
        row["measured"] = measured(load, quiet, time.perf_counter() - case_start)
        results.append(row)
        print(
            f"{name}: fp32 {row['fp32']['median_ms']:.1f} ms, w4a4 "
            f"{row['w4a4']['median_ms']:.1f} ms, x{row['ratio_median']:.2f}; as attack "
            f"copies x{row['ratio_median_attack_copy']:.2f}",
            flush=True,
        )
        save(
            out, env, repeats, results, time.perf_counter() - start, args.merge or len(results) > 1
        )
    print_table(
        f"Forward+backward w.r.t. the input, batch {BATCH}, 28x28x1 (goal: w4a4/fp32 <= {GOAL})",
        [
            "model",
            "fp32 ms",
            "w4a4 ms",
            "ratio (median)",
            "ratio (best)",
            "goal met",
            "attack copies: fp32 ms",
            "w4a4 ms",
            "ratio (median)",
            "goal met",
        ],
        [
            [
                r["model"],
                r["fp32"]["median_ms"],
                r["w4a4"]["median_ms"],
                r["ratio_median"],
                r["ratio_best"],
                "yes" if r["meets_goal"] else "NO",
                r["fp32 attack copy"]["median_ms"],
                r["w4a4 attack copy"]["median_ms"],
                r["ratio_median_attack_copy"],
                "yes" if r["meets_goal_attack_copy"] else "NO",
            ]
            for r in results
        ],
    )


def save(out: Path, env: dict, repeats: int, results: list, wall_s: float, merge: bool) -> None:
    """Written after every model, so an interrupted run keeps what it measured."""
    write_results(
        out,
        {
            "benchmark": "fake_quant_cost",
            "environment": env,
            "settings": {
                "batch_size": BATCH,
                "input": [1, 28, 28],
                "repeats": repeats,
                "quantization": "quantize(model, w4a4) (first/last layer 8 bit) + calibrate "
                "minmax on 256 mnist5k images; eval mode, frozen parameters and scales",
                "timing": "ms per forward+backward (CE, grad w.r.t. input); interleaved fp32, "
                "w4a4 runs, bare and as Attack.frozen_copies makes them; ratio of medians",
                "goal_ratio_max": GOAL,
            },
            "run_wall_s": wall_s,
            "results": results,
        },
        key=("model",),
        merge=merge,
    )


if __name__ == "__main__":
    main()
