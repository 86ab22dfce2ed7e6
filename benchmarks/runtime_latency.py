"""Batch-1 and batch-128 latency of every installed integer runtime on the same model.

For lenet (28x28x1) and resnet20 (32x32x3), each installed post-training deployment
(``ort-int8``, ``openvino-int8``, ``executorch-int8``, ``litert-int8``) exports the same fp32
network (its int8 artifact, calibrated on the same training images, and its fp32 artifact),
and each session is timed on one image and on 128 images, beside the torch fp32 model. The
weights are random (latency does not depend on them); the int8 artifacts are calibrated all
the same. Calls are interleaved across variants (A, B, A, B, ...) after a warm-up; the median
and the best call are printed, every call is in the JSON (on a shared machine the best is the
runtime's, the median the machine's). Static-shape runtimes (ExecuTorch, LiteRT) run
128 images as two calls of their 64-image method.

Run: ``python benchmarks/runtime_latency.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
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
    summary,
    wait_for_quiet,
    write_results,
)

from quantpatch.deployments import DEPLOYMENTS, create_deployment
from quantpatch.models import create_model

RUNTIMES = ("ort-int8", "openvino-int8", "executorch-int8", "litert-int8")
SHAPES = {"lenet": (28, False), "resnet20": (32, True)}  # image side, RGB
BATCHES = (1, 128)
CALIBRATION = 256


def installed(name: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in DEPLOYMENTS.get(name).modules)


def sessions(name: str, model: torch.nn.Module, calibration: torch.Tensor, work: Path) -> dict:
    """``{"<deployment>": int8 session, "<runtime> fp32": fp32 session}`` and export times."""
    deployment = create_deployment(name)
    int8_path = work / f"{name}.{deployment.suffix}"
    fp32_path = work / f"{name}-fp32.{deployment.suffix}"
    start = time.perf_counter()
    deployment.export(model, calibration, int8_path)
    int8_s = time.perf_counter() - start
    start = time.perf_counter()
    deployment.export_fp32(model, calibration, fp32_path)
    fp32_s = time.perf_counter() - start
    print(f"  {name}: int8 export {int8_s:.0f} s, fp32 export {fp32_s:.0f} s", flush=True)
    return {
        "sessions": {
            name: deployment.load(int8_path),
            f"{deployment.runtime} fp32": deployment.load(fp32_path),
        },
        "export_s": {name: round(int8_s, 1), f"{deployment.runtime} fp32": round(fp32_s, 1)},
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 20)
    runtimes = [r for r in args.runtimes if installed(r)]
    skipped = sorted(set(args.runtimes) - set(runtimes))
    if skipped:
        print(f"not installed (skipped): {', '.join(skipped)}", flush=True)
    env = environment(torch.device("cpu"), cores=cores, runtimes=runtimes, skipped=skipped)
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "runtime_latency.json")
    results: list[dict[str, Any]] = []
    for model_name in args.models:
        side, rgb = SHAPES[model_name]
        data = mnist(side if side != 28 else None, rgb=rgb)
        torch.manual_seed(0)
        model = create_model(
            model_name,
            in_channels=data.in_channels,
            num_classes=data.num_classes,
            image_size=data.image_size,
            mean=data.mean,
            std=data.std,
        ).eval()
        calibration = data.train.images[:CALIBRATION]
        images = data.test.images[: max(BATCHES)]
        print(f"{model_name}: exporting", flush=True)
        with tempfile.TemporaryDirectory(prefix="quantpatch-latency-") as work:
            variants: dict[str, Any] = {"torch fp32": model}
            exports: dict[str, float] = {}
            for name in runtimes:
                made = sessions(name, model, calibration, Path(work))
                variants.update(made["sessions"])
                exports.update(made["export_s"])
            for batch in BATCHES:
                quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
                start_load, start = load1(), time.perf_counter()
                x = images[:batch].contiguous()
                with torch.inference_mode():
                    for session in variants.values():  # warm-up
                        session(x)
                    calls = {
                        name: (lambda _r, s=session, x=x: s(x))
                        for name, session in variants.items()
                    }
                    times = interleaved(calls, repeats, torch.device("cpu"))
                wall = time.perf_counter() - start
                for name, runs in times.items():
                    results.append({
                        "model": model_name, "variant": name, "batch": batch,
                        "export_s": exports.get(name), **summary(runs),
                        **measured(start_load, quiet, wall),
                    })  # fmt: skip
    rows = [
        (r["model"], r["variant"], r["batch"], 1e3 * r["median_s"], 1e3 * r["best_s"],
         r["batch"] / r["best_s"])
        for r in results
    ]  # fmt: skip
    print_table(
        f"latency per call ({torch.get_num_threads()} threads, {cores} cores)",
        ("model", "session", "batch", "median ms", "best ms", "best img/s"),
        rows,
    )
    data_out = {
        "environment": env,
        "settings": {"batches": list(BATCHES), "repeats": repeats, "calibration": CALIBRATION},
        "results": results,
    }
    write_results(out, data_out, ("model", "variant", "batch"), args.merge)


if __name__ == "__main__":
    main()
