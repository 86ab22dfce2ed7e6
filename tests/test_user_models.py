"""Bring your own model: a user's ONNX file as a target (and a query attack's source), and a
timm architecture with fp32 weights from a local safetensors file, loaded instead of trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantpatch._io import save_tensors
from quantpatch.errors import (
    ConfigError,
    CorruptFileError,
    DataNotFoundError,
    ShapeError,
    UnknownNameError,
)
from quantpatch.models import create_model, evaluate_accuracy
from quantpatch.quant.onnx import export_onnx
from quantpatch.results import load_results
from quantpatch.study import load_study, run_study

pytest.importorskip("timm")

TIMM = "timm:test_resnet"


@pytest.fixture(scope="module")
def files(tmp_path_factory, mnist_lenet_fp32) -> dict[str, Path]:
    """The trained test LeNet exported to ONNX (it takes [0, 1] images: its normalisation is
    inside), a timm network with random weights, and a LeNet exported for 32 px RGB."""
    ds, lenet = mnist_lenet_fp32
    root = tmp_path_factory.mktemp("user-models")
    torch.manual_seed(0)
    timm_net = create_model(TIMM, in_channels=1, num_classes=10, image_size=28)
    save_tensors(root / "timm.safetensors", timm_net.state_dict(), {"arch": TIMM})
    save_tensors(root / "lenet.safetensors", lenet.state_dict(), {"arch": "lenet"})
    rgb = create_model("lenet", in_channels=3, num_classes=10, image_size=32).eval()
    return {
        "lenet.onnx": export_onnx(lenet, root / "lenet.onnx", ds.test.images[:2]),
        "timm.safetensors": root / "timm.safetensors",
        "lenet.safetensors": root / "lenet.safetensors",
        "rgb.onnx": export_onnx(rgb, root / "rgb.onnx", torch.rand(2, 3, 32, 32)),
        "root": root,
    }


def _settings(files: dict[str, Path], **changes) -> dict:
    return {
        "name": "byo",
        "n_eval": 60,
        "models": [TIMM],
        "precisions": ["fp32"],
        "deployments": [],
        "controls": False,
        "weights": {TIMM: str(files["timm.safetensors"])},
        "onnx_models": [{"name": "mynet", "path": str(files["lenet.onnx"])}],
        "attacks": [
            {"name": "sparse-rs", "params": {"queries": 40}, "sources": ["onnx"]},
            {"name": "random"},
        ],
        "patch_sizes": [8],
        "analyses": {"gradient_alignment": False, "features": False, "spatial": False,
                     "size_curve": False, "quant_strength": False},
        "device": "cpu",
        "cache_dir": str(files["root"] / "cache"),
        **changes,
    }  # fmt: skip


@pytest.fixture(scope="module")
def run(files) -> Path:
    config = load_study(None, **_settings(files))
    run_study(config, files["root"] / "run", progress=False)
    return files["root"] / "run"


def test_user_onnx_file_is_a_target_and_a_query_source(run: Path) -> None:
    results = load_results(run)
    models = {m.name: m for m in results.models}
    assert models["mynet/onnx"].runtime == "onnxruntime"
    assert models["mynet/onnx"].clean.rate > 0.9  # the trained LeNet, run by ORT
    own = [c for c in results.cells if c.threat == "query-only"]
    assert [c.target for c in own] == ["mynet/onnx"] and own[0].mean_queries <= 40
    assert any(c.source == "mynet/onnx" and c.target == f"{TIMM}/fp32" for c in results.cells)


def test_timm_weights_are_loaded_not_trained(run: Path, files, mnist_lenet_fp32) -> None:
    ds = mnist_lenet_fp32[0]
    model = create_model(TIMM, in_channels=1, num_classes=10, image_size=28,
                         weights=files["timm.safetensors"]).eval()  # fmt: skip
    expected = evaluate_accuracy(model, ds.test, "cpu")
    metadata = json.loads((run / "results.json").read_text())
    record = next(m for m in metadata["models"] if m["name"] == f"{TIMM}/fp32")
    assert record["clean"]["n"] == 60  # evaluated on the study's images, and untrained:
    assert abs(record["clean"]["rate"] - expected.rate) < 0.2 and expected.rate < 0.5


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"onnx_models": [{"name": "rgb", "path": "RGB"}]}, ShapeError, "expects input"),
        ({"onnx_models": [{"name": "x", "path": "/nonexistent.onnx"}]}, DataNotFoundError, "onnx"),
        ({"weights": {TIMM: "LENET"}}, CorruptFileError, "does not fit"),
        ({"models": ["timm:nope"], "weights": {}}, UnknownNameError, "timm"),
        (
            {"onnx_models": [{"name": "n", "path": "ONNX", "mean": [0.1, 0.2], "std": [1, 1]}]},
            ShapeError,
            "2 mean values",
        ),
        ({"onnx_models": []}, ConfigError, "sources name onnx"),
    ],
)
def test_user_models_that_do_not_fit_fail_before_any_work(files, change, error, message) -> None:
    change = json.loads(
        json.dumps(change).replace("RGB", str(files["rgb.onnx"])).replace(
            "LENET", str(files["lenet.safetensors"])).replace("ONNX", str(files["lenet.onnx"]))
    )  # fmt: skip
    out = files["root"] / "refused"
    with pytest.raises(error, match=message):
        run_study(load_study(None, **_settings(files, **change)), out, progress=False)
    assert not (out / "config.yaml").exists()
