"""Shared plumbing for the speed benchmarks: environment record, quiet-machine wait, cached
briefly-trained models, interleaved timing and table printing.

Benchmarks are scripts, not part of the package: they only use quantpatch's public API.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import quantpatch
from quantpatch._io import content_key, read_json, write_json_atomic
from quantpatch.data import Dataset, Split, load_dataset
from quantpatch.errors import QuantpatchError
from quantpatch.models import (
    TrainConfig,
    create_model,
    evaluate_accuracy,
    load_checkpoint,
    save_checkpoint,
    train_model,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "runs" / ".bench-cache"  # runs/ is git-ignored


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: every core)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help="first wait up to this long for the 1-minute load average to drop below 1.5",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the output file's other cases (re-measure some cases only)",
    )
    return parser


def setup_threads(threads: int | None = None) -> int:
    """Use every core (default): the benchmarks compare libraries under the same thread budget."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(threads or cores)
    return cores


def load1() -> float:
    return os.getloadavg()[0]


def cpu_busy(seconds: float = 5.0) -> float:
    """Share of all cores busy over the next ``seconds`` (from /proc/stat; 0 elsewhere)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return 0.0
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(minutes: float, threshold: float = 1.5, poll_s: float = 60.0) -> bool:
    """Wait until the machine is quiet: 1-minute load average below ``threshold`` and under
    15 % of the CPU busy over a 5 s sample (the load average lags a process that just
    started), or until ``minutes`` pass. Returns whether it was quiet. Timings on a shared
    machine are only comparable when nothing else runs."""
    deadline = time.monotonic() + 60.0 * minutes
    while True:
        load, busy = load1(), cpu_busy()
        if load < threshold and busy < 0.15:
            print(f"quiet: load {load:.2f}, {100 * busy:.0f} % busy", flush=True)
            return True
        if time.monotonic() >= deadline:
            print(f"still busy after {minutes} min (load {load:.2f}): measuring anyway", flush=True)
            return False
        print(f"load {load:.2f}, {100 * busy:.0f} % busy: waiting for a quiet machine", flush=True)
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 1.0)))


def environment(device: torch.device, **extra: Any) -> dict[str, Any]:
    """What the numbers depend on: cores, threads, versions, device, load at the start."""
    try:
        import art

        art_version = art.__version__
    except ImportError:
        art_version = None
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "art": art_version,
        "quantpatch": quantpatch.__version__ if hasattr(quantpatch, "__version__") else _dist(),
        "device": str(device),
        "load1_at_start": round(load1(), 2),
        **extra,
    }


def _dist() -> str:
    from importlib.metadata import version

    return version("quantpatch")


def write_results(path: Path, data: dict[str, Any], key: Sequence[str], merge: bool) -> None:
    """Write ``data`` (whose ``results`` is a list of case dicts) atomically. With ``merge``,
    cases of an existing file whose ``key`` fields differ from every new case are kept, so
    cases can be (re)measured one at a time whenever the machine is quiet."""
    data["environment"]["load1_at_end"] = round(load1(), 2)
    if merge and path.is_file():
        new = {tuple(c[k] for k in key) for c in data["results"]}
        old = [c for c in read_json(path).get("results", []) if tuple(c[k] for k in key) not in new]
        data["results"] = sorted(old + data["results"], key=lambda c: tuple(c[k] for k in key))
    write_json_atomic(path, data)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)


def measured(start_load: float, quiet: bool | None, wall_s: float) -> dict[str, Any]:
    """When and under what load one case was measured (kept per case, since cases merge)."""
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load1_before": round(start_load, 2),
        "load1_after": round(load1(), 2),
        "waited_for_quiet": quiet,
        "wall_s": round(wall_s, 1),
    }


# -- data and models ------------------------------------------------------------------------------


def mnist(image_size: int | None = None, rgb: bool = False) -> Dataset:
    """mnist5k, optionally resized and repeated to 3 channels (a 32x32x3 stand-in for CIFAR)."""
    data = load_dataset("mnist5k", image_size=image_size)
    if not rgb:
        return data
    train = Split(data.train.images.repeat(1, 3, 1, 1).contiguous(), data.train.labels)
    test = Split(data.test.images.repeat(1, 3, 1, 1).contiguous(), data.test.labels)
    return Dataset(
        name=f"{data.name}-rgb{image_size}",
        train=train,
        test=test,
        classes=data.classes,
        mean=tuple(data.mean) * 3,
        std=tuple(data.std) * 3,
    )


# The two benchmark models: lenet on mnist5k (28x28x1) and resnet20 on mnist5k resized to 32 px
# and repeated to 3 channels (a CIFAR-shaped input), each trained briefly.
BENCH_MODELS: dict[str, dict[str, Any]] = {
    "lenet": {"size": None, "rgb": False, "train": {"epochs": 3, "lr": 0.05}},
    "resnet20": {"size": 32, "rgb": True, "train": {"epochs": 3, "lr": 0.1}},
}


def bench_model(name: str, device: torch.device) -> tuple[torch.nn.Module, Dataset, float]:
    """(trained model in eval mode, its dataset, clean test accuracy) of a benchmark model."""
    setup = BENCH_MODELS[name]
    data = mnist(setup["size"], rgb=setup["rgb"])
    model, acc = trained_model(name, data, TrainConfig(**setup["train"]), device)
    return model, data, acc


def train_defence_model(
    model: torch.nn.Module, data: Dataset, epochs: int, device, input_transform: Callable | None
) -> tuple[torch.nn.Module, float]:
    """(``model`` trained on ``data`` through a defence's ``input_transform``, seconds): the
    certified benchmarks' one schedule (lr 0.05, batch 64, seed 0)."""
    started = time.perf_counter()
    config = TrainConfig(epochs=epochs, lr=0.05, batch_size=64, seed=0)
    train_model(model, data.train, config, device, False, input_transform=input_transform)
    return model.eval(), time.perf_counter() - started


def trained_model(
    name: str, data: Dataset, config: TrainConfig, device: torch.device
) -> tuple[torch.nn.Module, float]:
    """A briefly trained model (so ASR means something), cached under runs/.bench-cache."""
    model = create_model(
        name,
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
    )
    what = {"model": name, "data": data.name, "size": data.image_size, "ch": data.in_channels}
    key = content_key({**what, "train": config.model_dump()})
    path = CACHE / f"{name}-{data.name}-{key}.safetensors"
    try:
        load_checkpoint(path, model)
    except QuantpatchError:
        start = time.perf_counter()
        train_model(model, data.train, config, device, progress=False, desc=name)
        print(f"trained {name} on {data.name} in {time.perf_counter() - start:.0f} s", flush=True)
        save_checkpoint(path, model, {"train": config.model_dump()})
    model.to(device).eval()
    return model, evaluate_accuracy(model, data.test, device).rate


# -- timing ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    variants: dict[str, Callable[[int], Any]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Time each variant ``repeats`` times in A, B, A, B order (wall seconds per call), so slow
    phases of a noisy machine hit every variant alike. Variants get the repeat index."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            fn(r)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: Sequence[float]) -> dict[str, float]:
    return {
        "best_s": min(times),
        "median_s": statistics.median(times),
        "runs_s": [round(t, 6) for t in times],
    }


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table (readable in a terminal and in the README)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
