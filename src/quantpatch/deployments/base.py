"""The deployment contract and its registry."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from quantpatch._registry import Registry
from quantpatch.errors import ConfigError
from quantpatch.quant import QuantSpec

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""A runtime session: images (N, C, H, W) in [0, 1] on the CPU -> logits."""

DEPLOYMENTS: Registry = Registry("deployment")
"""Deployment classes by name (the name is also the target's precision label in results)."""


def create_deployment(name: str) -> Deployment:
    """The deployment ``name``, refused in one line when its runtime is not installed."""
    deployment = DEPLOYMENTS.get(name)()
    deployment.require()
    return deployment


_IMPORT_NOTICES = ("torch.utils._pytree", "torch.utils.cpp_extension")
"""torch loggers that torchao's import writes to (an Enum registration notice, "no CUDA
runtime") on every run; neither says anything about the user's models."""


def import_quietly(module: str) -> None:
    """Import ``module`` (torchao, pulled in by ExecuTorch, LiteRT-Torch and NNCF's FX backend)
    once with those notices off; later imports of it are free and silent."""
    if module in sys.modules or importlib.util.find_spec(module) is None:
        return
    loggers = [logging.getLogger(name) for name in _IMPORT_NOTICES]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")  # notices at its own import
        importlib.import_module(module)
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Drop what native code writes to file descriptor 2 inside the block (ExecuTorch's CPU
    probe prints five lines about missing ARM registers the first time its thread pool
    starts); Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Deployment(ABC):
    """One way to run a model on an integer runtime.

    The study caches what ``export`` and ``export_fp32`` write (keyed by the source model,
    ``fingerprint()`` and this file's code, never by the model code), loads them with
    ``load``, and checks the runtime against ``simulation`` with the runtime's own fp32
    network as the null. Everything here is a pure function of its arguments."""

    name: ClassVar[str]
    runtime: ClassVar[str]
    """The runtime's name in results, e.g. ``onnxruntime``."""
    kind: ClassVar[str]
    """``ptq`` (the runtime quantizes the fp32 network) or ``qat`` (the QAT model as trained)."""
    source: ClassVar[QuantSpec | None] = None
    """The QAT precision this deploys as trained; ``None``: the fp32 network."""
    suffix: ClassVar[str]
    """The file suffix of the exported artifacts."""
    modules: ClassVar[tuple[str, ...]] = ()
    """Python modules the runtime needs; missing ones are refused with ``extra``'s hint."""
    extra: ClassVar[str | None] = None
    """The pip extra that installs the runtime (``quantpatch[<extra>]``)."""

    def require(self) -> None:
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            hint = f"pip install 'quantpatch[{self.extra}]'" if self.extra else "pip install it"
            raise ConfigError(f"deployment '{self.name}' needs {', '.join(missing)}: {hint}")

    def fingerprint(self) -> dict[str, Any]:
        """What else the artifacts depend on (e.g. the CPU's int8 kernels): part of the key."""
        return {}

    def spec(self, model_spec: QuantSpec) -> QuantSpec:
        """The precision the runtime computes at, for results (``model_spec``: the source's)."""
        return model_spec

    @abstractmethod
    def export(self, model: nn.Module, calibration: torch.Tensor, path: Path) -> None:
        """Write the deployed (integer) artifact of ``model`` to ``path``."""

    @abstractmethod
    def export_fp32(self, model: nn.Module, example: torch.Tensor, path: Path) -> None:
        """Write the fp32 network in this runtime: the check's null and speed reference."""

    @abstractmethod
    def load(self, path: Path) -> Predictor:
        """Open an exported artifact as a session."""

    @abstractmethod
    def simulation(
        self, model: nn.Module, calibration: torch.Tensor, device: torch.device
    ) -> nn.Module:
        """The torch model that should predict the runtime: its rules reproduced in fake-quant,
        or the trained fake-quant model itself."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
