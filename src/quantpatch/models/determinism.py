"""What decides training numerics, recorded; and training pinned to settings torch keeps exact.

On a CPU, trained weights depend bit-for-bit on the number of intra-op threads (a conv's
weight gradient is summed in per-thread chunks, so the rounding changes with the split), on
the kernels torch picks for the CPU (``get_cpu_capability()``: AVX-512, AVX2, ...) and on the
ISA oneDNN picks. ``deterministic_training`` pins the first to ``TRAINING_THREADS`` whatever the
process uses, so a run's weights do not depend on ``OMP_NUM_THREADS`` or ``torch.set_num_threads``
elsewhere; the other two follow the machine and can only be recorded (``training_numerics``).
Bit-identical weights across machines with different CPUs are therefore not promised:
independent training replicates are what make a finding hold.
"""

from __future__ import annotations

import os
import platform
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from quantpatch._runtime import resolve_device
from quantpatch.errors import ConfigError

TRAINING_THREADS = 2
"""Intra-op threads for CPU training: one count every machine can run (the reference machine
has 2 cores; a 1-core machine runs 2 threads, only slower), so two machines with the same CPU
kernels train the same weights whatever their core counts."""

_NUMERICS_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
    "CUBLAS_WORKSPACE_CONFIG",
)
_CUBLAS_DETERMINISTIC = ":4096:8"  # the cuBLAS workspace setting torch's determinism needs


@contextmanager
def deterministic_training(
    seed: int | None = None,
    threads: int | None = TRAINING_THREADS,
    device: torch.device | str = "cpu",
) -> Iterator[None]:
    """Train inside settings that make a run repeatable, and restore the caller's afterwards.

    On a CPU device, pins torch's intra-op threads to ``threads`` (None: leave them);
    everywhere, turns on ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op
    without a deterministic kernel warns instead of failing) and deterministic, non-benchmarked
    cuDNN. With ``seed``, the python, numpy and torch random streams are seeded inside and the
    caller's streams are restored after, so what ran before does not change dropout draws and
    training does not shift the caller's later draws. Inter-op threads are not touched: torch
    fixes them once per process, and training does not use them.
    """
    if threads is not None and threads < 1:
        raise ConfigError(f"training threads must be >= 1, got {threads}")
    device = resolve_device(device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_DETERMINISTIC)
    saved_threads = torch.get_num_threads()
    saved_deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    saved_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    saved_python, saved_numpy = random.getstate(), np.random.get_state()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices, enabled=seed is not None):
        try:
            if threads is not None and device.type == "cpu":
                torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            if seed is not None:
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.manual_seed(seed)
            yield
        finally:
            torch.set_num_threads(saved_threads)
            enabled, warn_only = saved_deterministic
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved_cudnn
            if seed is not None:
                random.setstate(saved_python)
                np.random.set_state(saved_numpy)


def training_numerics(
    device: torch.device | str = "cpu", threads: int | None = TRAINING_THREADS
) -> dict[str, Any]:
    """What decides trained weights bit-for-bit here, as plain data for results.json: the
    torch build and its math libraries, the kernels chosen for this CPU, the thread count and
    determinism settings training runs with, and any environment variable that changes them."""
    device = resolve_device(device)
    config = torch.__config__.show()
    record: dict[str, Any] = {
        "torch": torch.__version__,
        "device": str(device),
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": _version(r"Math Kernel Library Version ([\d.]+)", config),
        "onednn": _version(r"(?:MKL-DNN|oneDNN) v([\d.]+)", config),
        "training_threads": threads if device.type == "cpu" else None,
        "process_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": True,
        "deterministic_warn_only": True,
        "cudnn_deterministic": True,
        "env": {name: os.environ[name] for name in _NUMERICS_ENV if name in os.environ},
    }
    if device.type == "cuda":
        record["cuda"] = torch.version.cuda
        record["cudnn"] = torch.backends.cudnn.version()
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def _version(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
