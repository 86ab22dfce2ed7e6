"""quantpatch.quant.onnx: export, ORT static int8, and the simulated-vs-real int8 check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from quantpatch.errors import CorruptFileError, DataNotFoundError, InvalidSpecError, ShapeError
from quantpatch.metrics import Rate
from quantpatch.quant import (
    FakeQuantizer,
    QuantSpec,
    build_quantized,
    calibrate,
    quant_layers,
    quantize,
)
from quantpatch.quant.onnx import (
    Int8Check,
    OrtModel,
    compare_int8,
    export_onnx,
    export_qdq,
    fold_batchnorm,
    int8_saturates,
    quantize_onnx_int8,
    simulate_ort_int8,
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


CALIBRATION = 256


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(
            False,
            id="8bit-weights",
            marks=pytest.mark.skipif(
                int8_saturates(), reason="this CPU's u8 x s8 kernels saturate with 8-bit weights"
            ),
        ),
        pytest.param(True, id="reduce-range"),
    ],
)
def ort_lenet(request, mnist_lenet, tmp_path_factory):
    """ORT static int8 of the LeNet, its matched simulation (same calibration images and
    reduce_range), the ORT fp32 session, and the int8 file."""
    ds, fp32 = mnist_lenet
    calib = ds.train.stratified(CALIBRATION, 0).images
    work = tmp_path_factory.mktemp("ort")
    fp32_path = export_onnx(fp32, work / "lenet.onnx", calib[:2])
    int8_path = quantize_onnx_int8(fp32_path, work / "int8.onnx", calib, reduce_range=request.param)
    sim = simulate_ort_int8(fp32, calib, reduce_range=request.param, device="cpu")
    return ds, OrtModel(int8_path), sim, OrtModel(fp32_path), int8_path


def _initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i).copy() for i in onnx.load(str(path)).graph.initializer}


def _codes(layer: nn.Module) -> torch.Tensor:
    """The integer weight codes of a quantized layer."""
    scale = layer.weight_quant.scale.detach().view(-1, *[1] * (layer.weight.dim() - 1))
    return (layer.quantized_weight().detach() / scale).round()


def _assert_same_codes(layer: nn.Module, codes: torch.Tensor) -> None:
    """The simulation's weight codes are ORT's, except at exact rounding ties (w / scale a
    half-integer up to float error), where the order of ORT's float arithmetic decides: there,
    one code apart at most (seen: 1 of 1.2 M weights of a trained LeNet's 9216x128 layer)."""
    mine = _codes(layer)
    differ = mine != codes
    if not differ.any():
        return
    scale = layer.weight_quant.scale.detach().view(-1, *[1] * (layer.weight.dim() - 1))
    ratio = (layer.weight.detach() / scale).expand_as(mine)[differ]
    assert (mine[differ] - codes[differ]).abs().max() == 1
    assert ((ratio - ratio.floor() - 0.5).abs() < 1e-3).all(), ratio
    assert int(differ.sum()) <= max(1, codes.numel() // 100_000)


def test_simulation_takes_ort_quantization_parameters(ort_lenet) -> None:
    """Same codes, scales and zero points as ORT's quantizer chose, computed independently."""
    _, int8, sim, _, path = ort_lenet
    found = _initializers(path)
    layers = dict(quant_layers(sim))
    assert set(layers) == {
        "net.features.0",
        "net.features.2",
        "net.classifier.1",
        "net.classifier.3",
    }
    for name, layer in layers.items():  # every layer at 8 bit, first and last included
        scale = torch.from_numpy(found[f"{name}.weight_scale"])
        torch.testing.assert_close(layer.weight_quant.scale.detach(), scale, rtol=1e-6, atol=0)
        codes = torch.from_numpy(found[f"{name}.weight_quantized"]).float()
        _assert_same_codes(layer, codes)
        assert int(codes.abs().max()) == layer.weight_quant.grid.qmax  # 127, or 64 (reduce_range)
        bias = (
            found[f"{name}.bias_quantized"].astype(np.float32)
            * found[f"{name}.bias_quantized_scale"]
        )
        torch.testing.assert_close(layer.bias.detach(), torch.from_numpy(bias), rtol=1e-6, atol=0)
    # activations: ORT's per-tensor (scale, zero point) pairs, logits included, are ours
    ort_acts = sorted(
        (float(found[k]), int(found[k.replace("_scale", "_zero_point")]))
        for k in found
        if k.endswith("_scale") and found[k].size == 1 and "weight" not in k and "bias" not in k
    )
    weight_quants = {id(layer.weight_quant) for layer in layers.values()}
    ours = sorted(
        {(float(q.scale), int(q.zero_point)) for q in sim.modules()
         if isinstance(q, FakeQuantizer) and id(q) not in weight_quants}
    )  # fmt: skip
    assert [zp for _, zp in ours] == [zp for _, zp in ort_acts]
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in ort_acts], rel=1e-6)


def test_matched_simulation_predicts_ort_int8_better_than_fp32(ort_lenet) -> None:
    ds, int8, sim, fp32, _ = ort_lenet
    images, labels = ds.test.images, ds.test.labels
    patched = images.clone()
    patched[:, :, 4:14, 4:14] = 1.0  # a white 10x10 patch: inputs far from the calibration set
    check = compare_int8(
        int8, sim, fp32, images, labels, adversarial=patched, device="cpu", repeats=1
    )
    assert isinstance(check, Int8Check) and check.adversarial is not None
    for kind in (check.clean, check.adversarial):
        print(kind)
        for match in (kind.simulation, kind.fp32):
            assert isinstance(match.top1, Rate) and match.top1.n == len(labels)
            assert isinstance(match.reference_accuracy, Rate)
        assert isinstance(kind.int8_accuracy, Rate) and kind.int8_accuracy.n == len(labels)
        # the simulation reproduces ORT int8 (LeNet: up to float rounding), fp32 does not
        assert kind.simulation.top1.rate >= max(kind.fp32.top1.rate, 0.999)
        assert kind.simulation.logit_error < 1e-4 < 1e-3 < kind.fp32.logit_error
        assert kind.simulation_closer
    assert check.int8_img_per_s > 0 and check.fp32_img_per_s > 0
    assert check.speedup_vs_fp32 == pytest.approx(check.int8_img_per_s / check.fp32_img_per_s)
    assert check.clean.fp32.reference_accuracy.rate >= 0.95  # fp32 is the trained LeNet


def test_compare_int8_checks_shapes() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images, labels = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ShapeError, match="labels"):
        compare_int8(model, model, model, images, labels[:3], device="cpu", repeats=1)
    with pytest.raises(ShapeError, match="adversarial"):
        compare_int8(
            model, model, model, images, labels, adversarial=images[:2], device="cpu", repeats=1
        )
    check = compare_int8(model, model, model, images, labels, device="cpu", repeats=1)
    assert check.adversarial is None
    assert check.clean.simulation.top1.rate == 1.0 and check.clean.simulation.logit_error == 0.0


class BNNet(nn.Module):
    """conv-BN-ReLU twice (the first conv's output is quantized next: an integer kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1))


@pytest.fixture(scope="module")
def bn_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = BNNet().train()
    with torch.no_grad():
        for _ in range(4):  # non-trivial running statistics
            model(torch.rand(32, 3, 8, 8))
        model.features[1].weight[:3] *= -1  # negative gammas flip the folded codes' signs
    return model.eval(), torch.rand(64, 3, 8, 8)


def test_fold_batchnorm_keeps_the_function_and_the_codes(bn_net) -> None:
    model, x = bn_net
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    q = calibrate(quantize(model, QuantSpec(8, 8)), x, "minmax", "cpu")
    folded_q = fold_batchnorm(q)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded_q.modules())
    for (_, before), (_, after) in zip(quant_layers(q), quant_layers(folded_q), strict=True):
        assert torch.equal(_codes(before).abs(), _codes(after).abs())  # signs flip where gamma < 0
    with torch.no_grad():  # equal up to float rounding (which can move an activation one step)
        out, ref = folded_q(x), q(x)
    assert float((out - ref).norm() / ref.norm()) < 1e-3
    assert model.features[1].training is False  # the input model is left as it was


def test_export_qdq_carries_the_model_own_scales(bn_net, tmp_path: Path) -> None:
    import onnx

    model, x = bn_net
    q = calibrate(quantize(model, QuantSpec(8, 8)), x, "minmax", "cpu")
    path = export_qdq(q, tmp_path / "q.onnx", x[:2])
    graph = onnx.load(str(path)).graph
    assert "BatchNormalization" not in {node.op_type for node in graph.node}
    found = _initializers(path)
    exported = {float(v) for v in found.values() if v.dtype == np.float32 and v.size == 1}
    for _, layer in quant_layers(q):  # every activation quantizer, with its own scale
        assert float(layer.act_quant.scale) in exported
    ort = OrtModel(path)
    assert ort.kernels()["int8"] >= 1  # the first conv runs on an integer kernel
    with torch.no_grad():
        ref = q(x)
    assert float((ort(x) - ref).norm() / ref.norm()) < 0.01


@pytest.mark.parametrize("name", ["w4a4", "w8a32", "fp32", "w8a8-asym"])
def test_export_qdq_refuses_what_int8_kernels_cannot_run(name: str, bn_net, tmp_path) -> None:
    model, x = bn_net
    q = quantize(model, QuantSpec.parse(name))
    with pytest.raises(InvalidSpecError, match="cannot deploy .* on ORT int8 kernels"):
        export_qdq(q, tmp_path / "q.onnx", x[:2])
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
def test_qat_w8a8_deploys_as_trained(mnist_lenet, tmp_path: Path) -> None:
    """The QAT model exported with its learned scales: ORT agrees with it, not with fp32."""
    from quantpatch.models import TrainConfig

    ds, fp32 = mnist_lenet
    qat = build_quantized(
        fp32,
        QuantSpec.parse("w8a8"),
        ds.train.stratified(2000, 0),
        qat=TrainConfig(epochs=1, lr=0.01, batch_size=64),
        device="cpu",
        progress=False,
    )
    images, labels = ds.test.images, ds.test.labels
    ort_fp32 = OrtModel(export_onnx(fp32, tmp_path / "fp32.onnx", images[:2]))
    # uint8 weights (zero point 128) everywhere; int8 weights where u8 x s8 does not saturate
    for uint8_weights in [True] + ([] if int8_saturates() else [False]):
        path = export_qdq(qat, tmp_path / f"qat-{uint8_weights}.onnx", images[:2],
                          uint8_weights=uint8_weights)  # fmt: skip
        ort = OrtModel(path)
        check = compare_int8(ort, qat, ort_fp32, images, labels, device="cpu", repeats=1)
        print(uint8_weights, ort.kernels(), check.clean)
        assert check.clean.simulation.top1.n == 1000
        assert check.clean.simulation.top1.rate >= 0.99
        assert check.clean.simulation.logit_error < 0.01
        assert check.clean.simulation_closer
        assert ort.kernels()["int8"] >= 2  # conv1 and fc1 run on integer kernels


def test_int8_saturation_check_follows_the_cpu() -> None:
    assert int8_saturates("x86_64", "flags\t: fpu sse2 avx2 fma\n")  # no VNNI: int16 saturates
    assert not int8_saturates("x86_64", "flags\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert not int8_saturates("x86_64", "flags\t: fpu sse2 avx2 avx_vnni\n")
    assert not int8_saturates("aarch64", "Features\t: fp asimd\n")
    assert isinstance(int8_saturates(), bool)  # this machine
