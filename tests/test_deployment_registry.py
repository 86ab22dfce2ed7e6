"""A new runtime is one registered class: it joins a study's grid as a target of every cell,
with its own check, and editing it never retrains a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from quantpatch.deployments import DEPLOYMENTS, Deployment
from quantpatch.errors import ConfigError, UnknownNameError
from quantpatch.study import load_study, run_study
from quantpatch.study.store.cache import (
    DEPLOYMENT_CODE,
    MODEL_CODE,
    PACKAGE_ROOT,
    code_fingerprint,
)


class HalfPrecision(Deployment):
    """weights rounded to fp16, run by ONNX Runtime: a stand-in for a new runtime"""

    name = "dummy-fp16"
    runtime = "dummy"
    kind = "ptq"
    suffix = "onnx"

    def export(self, model: nn.Module, calibration: torch.Tensor, path: Path) -> None:
        import copy

        rounded = copy.deepcopy(model).cpu()
        with torch.no_grad():
            for tensor in rounded.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())
        self.export_fp32(rounded, calibration, path)

    def export_fp32(self, model: nn.Module, example: torch.Tensor, path: Path) -> None:
        from quantpatch.quant.onnx import export_onnx

        export_onnx(model, path, example[:2])

    def load(self, path: Path):
        from quantpatch.quant.onnx import OrtModel

        return OrtModel(path)

    def simulation(self, model: nn.Module, calibration: torch.Tensor, device) -> nn.Module:
        return model


@pytest.fixture
def dummy(monkeypatch: pytest.MonkeyPatch) -> type[Deployment]:
    monkeypatch.setitem(DEPLOYMENTS._entries, HalfPrecision.name, HalfPrecision)
    monkeypatch.setitem(DEPLOYMENTS._help, HalfPrecision.name, "a test runtime")
    return HalfPrecision


SMALL = {
    "name": "dummy-runtime",
    "limit": 400,
    "n_eval": 50,
    "models": ["lenet"],
    "precisions": ["fp32"],
    "controls": False,
    "attacks": [{"name": "random"}, {"name": "pgd-linf", "params": {"eps": 0.1, "steps": 3}}],
    "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
    "analyses": {"gradient_alignment": False, "features": False, "spatial": False,
                 "size_curve": False, "quant_strength": False},
    "device": "cpu",
}  # fmt: skip


def test_a_deployment_in_one_file_joins_the_grid(tmp_path: Path, dummy) -> None:
    config = load_study(None, **SMALL, deployments=["dummy-fp16"], cache_dir=tmp_path / "cache")
    results = json.loads(run_study(config, tmp_path / "run", progress=False).read_text())
    model = next(m for m in results["models"] if m["name"] == "lenet/dummy-fp16")
    assert model["runtime"] == "dummy"
    assert model["deployment"]["deployment"] == "dummy-fp16"
    # fp16 agrees with its simulation (the fp32 model) on clean images almost everywhere
    assert model["deployment"]["clean"]["simulation"]["agreement"]["rate"] > 0.95
    scored = {(c["attack"], c["threat"]) for c in results["cells"]
              if c["target"] == "lenet/dummy-fp16"}  # fmt: skip
    assert scored == {("random", "source-free"), ("pgd-linf", "transfer")}


def test_unknown_or_missing_runtimes_are_refused(monkeypatch, dummy) -> None:
    with pytest.raises(ConfigError, match="deployment"):
        load_study(None, deployments=["tflite-int9"])
    monkeypatch.setattr(HalfPrecision, "modules", ("a_runtime_that_is_not_installed",))
    from quantpatch.deployments import create_deployment

    with pytest.raises(ConfigError, match=r"needs a_runtime_that_is_not_installed"):
        create_deployment("dummy-fp16")
    with pytest.raises(UnknownNameError):
        DEPLOYMENTS.get("nope")


def test_a_qat_deployment_joins_only_when_its_precision_is_trained() -> None:
    assert load_study(None).deployed_precisions == ["ort-int8", "ort-w8a8"]
    without = load_study(None, precisions=["fp32", "w4a4"])
    assert without.deployed_precisions == ["ort-int8"]


def test_editing_a_deployment_never_changes_a_model_key(tmp_path: Path) -> None:
    copy = tmp_path / "quantpatch"
    shutil.copytree(PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    models = code_fingerprint(*MODEL_CODE, root=copy)
    deployed = code_fingerprint(*DEPLOYMENT_CODE, root=copy)
    for edited in ("deployments/onnxruntime.py", "study/zoo/deployed.py"):
        path = copy / edited
        path.write_text(path.read_text() + "\n# a stricter check\n")
    code_fingerprint.cache_clear()  # fingerprints are cached per process
    assert code_fingerprint(*MODEL_CODE, root=copy) == models  # no model retrains
    assert code_fingerprint(*DEPLOYMENT_CODE, root=copy) != deployed  # deployed files rebuild


def test_native_noise_is_dropped_only_inside_the_block(capfd) -> None:
    """ExecuTorch's CPU probe writes to fd 2 from C++; the block drops exactly that, and
    torch's import-time notices stay off while a runtime's torchao is imported."""
    import logging
    import os

    from quantpatch.deployments.base import import_quietly, native_stderr_silenced

    with native_stderr_silenced():
        os.write(2, b"cpuinfo noise\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
    import sys

    sys.modules.pop("colorsys", None)
    level = logging.getLogger("torch.utils._pytree").level
    import_quietly("colorsys")  # any module not yet imported: the loggers are restored after
    assert "colorsys" in sys.modules
    assert logging.getLogger("torch.utils._pytree").level == level
