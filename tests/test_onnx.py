"""quantpatch.quant.onnx: export, ORT static int8, and the simulated-vs-real int8 check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from quantpatch.errors import CorruptFileError, DataNotFoundError
from quantpatch.metrics import Rate
from quantpatch.quant import QuantSpec, build_quantized
from quantpatch.quant.onnx import (
    OrtModel,
    compare_int8,
    export_onnx,
    int8_saturates,
    quantize_onnx_int8,
    throughput,
)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) / 0.25)


def test_import_quant_does_not_import_onnxruntime() -> None:
    code = "import sys, quantpatch.quant; sys.exit('onnxruntime' in sys.modules)"
    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": src}, timeout=120)
    assert done.returncode == 0


def test_export_round_trip_with_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN().train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, which export must use (eval mode)
        model(torch.rand(64, 3, 8, 8) * 2)
    path = export_onnx(model, tmp_path / "sub" / "small.onnx", torch.rand(2, 3, 8, 8))
    assert model.training  # mode restored
    model.eval()
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["small.onnx"]  # no temp file left behind
    ort = OrtModel(path, batch_size=3)
    images = torch.rand(7, 3, 8, 8)  # not the example's batch size, and not a multiple of 3
    logits = ort(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (7, 5)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), atol=1e-4, rtol=1e-4)
    assert throughput(ort, images, repeats=1) > 0


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError):
        OrtModel(tmp_path / "absent.onnx")
    with pytest.raises(DataNotFoundError):
        quantize_onnx_int8(tmp_path / "absent.onnx", tmp_path / "out.onnx", torch.rand(4, 3, 8, 8))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not an onnx model at all" * 10)
    with pytest.raises(CorruptFileError):
        OrtModel(bad)
    with pytest.raises(CorruptFileError):
        quantize_onnx_int8(bad, tmp_path / "out.onnx", torch.rand(4, 3, 8, 8))
    assert not (tmp_path / "out.onnx").exists()


def test_int8_small_model_tracks_float(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    calib = torch.rand(64, 3, 8, 8)
    fp32_path = export_onnx(model, tmp_path / "f.onnx", calib[:2])
    # an untrained net with uniform-noise inputs is the worst case for int16 saturation in
    # ORT's u8 x s8 kernels on non-VNNI CPUs, so this uses 7-bit weights
    int8_path = quantize_onnx_int8(fp32_path, tmp_path / "i8.onnx", calib, reduce_range=True)
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    images = torch.rand(32, 3, 8, 8)
    with torch.no_grad():
        ref = model(images)
    out = OrtModel(int8_path)(images)
    assert not torch.equal(out, ref)  # really quantized ...
    assert float((out - ref).norm() / ref.norm()) < 0.05  # ... and close


@pytest.fixture(scope="module")
def mnist_lenet(mnist_lenet_fp32):
    """(dataset, trained fp32 LeNet), from the session fixture in conftest."""
    return mnist_lenet_fp32


@pytest.mark.slow
def test_ort_int8_matches_simulated_w8a8(mnist_lenet, tmp_path: Path) -> None:
    from quantpatch.models import evaluate_accuracy

    ds, fp32 = mnist_lenet
    calib = ds.train.images[:512]
    fp32_path = export_onnx(fp32, tmp_path / "lenet.onnx", calib[:2])
    int8_path = quantize_onnx_int8(fp32_path, tmp_path / "lenet-int8.onnx", calib)
    sim = build_quantized(fp32, QuantSpec.parse("w8a8-ptq"), ds.train, device="cpu")
    int8, ort_fp32 = OrtModel(int8_path), OrtModel(fp32_path)
    result = compare_int8(int8, sim, ds.test, "cpu", fp32=ort_fp32, repeats=1)
    fp32_acc = evaluate_accuracy(fp32, ds.test, "cpu")
    print({k: str(v) for k, v in result.items()}, "fp32", fp32_acc)
    assert isinstance(result["agreement"], Rate) and result["agreement"].n == len(ds.test)
    assert result["agreement"].rate >= 0.98
    assert abs(result["ort_int8_accuracy"].rate - fp32_acc.rate) <= 0.01
    assert result["ort_fp32_accuracy"] == fp32_acc  # the exported float graph is the model
    assert result["int8_img_per_s"] > 0 and result["fp32_img_per_s"] > 0
    assert result["speedup_vs_fp32"] == pytest.approx(
        result["int8_img_per_s"] / result["fp32_img_per_s"]
    )


def test_int8_saturation_check_follows_the_cpu() -> None:
    assert int8_saturates("x86_64", "flags\t: fpu sse2 avx2 fma\n")  # no VNNI: int16 saturates
    assert not int8_saturates("x86_64", "flags\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert not int8_saturates("x86_64", "flags\t: fpu sse2 avx2 avx_vnni\n")
    assert not int8_saturates("aarch64", "Features\t: fp asimd\n")
    assert isinstance(int8_saturates(), bool)  # this machine
