"""Deployments: each integer runtime agrees with its matched simulation on clean images, better
than the fp32 network does, and a missing runtime is refused in one line.

Runtimes that are not installed (``quantpatch[openvino]``, ``quantpatch[executorch]``,
``quantpatch[litert]``) skip.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import fx, nn
from torch.ao.quantization.fx import _decomposed  # noqa: F401 - registers the q/dq ops

from quantpatch.deployments import DEPLOYMENTS, create_deployment
from quantpatch.errors import ConfigError, InvalidSpecError
from quantpatch.quant import FakeQuantizer, QuantSpec, build_quantized
from quantpatch.quant.pt2e import fake_quant_graph

N_IMAGES = 200
N_CALIBRATION = 256


def _needs(name: str) -> pytest.MarkDecorator:
    """Skip (before any fixture is built) where the deployment's runtime is not installed."""
    missing = [m for m in DEPLOYMENTS.get(name).modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{name} needs {', '.join(missing)}")


def _each(*names: str) -> list:
    return [pytest.param(name, marks=_needs(name)) for name in names]


PTQ = _each("ort-int8", "openvino-int8", "executorch-int8", "litert-int8")
QAT = _each("ort-w8a8", "openvino-w8a8")


@pytest.fixture(scope="module")
def lenet(lab):
    """The attack tests' LeNet, calibration images from its training split and 200 test images."""
    generator = torch.Generator().manual_seed(0)
    calibration = lab.train.images[torch.randperm(len(lab.train), generator=generator)]
    return lab.model, calibration[:N_CALIBRATION], lab.images[:N_IMAGES]


@pytest.fixture(scope="module")
def qat_w8a8(lab, lenet):
    from quantpatch.models import TrainConfig

    model, calibration, _ = lenet
    config = TrainConfig(epochs=1, lr=0.01, batch_size=64, seed=0)
    return build_quantized(model, QuantSpec(8, 8), lab.train, qat=config, device="cpu",
                           calibration_images=calibration, progress=False)  # fmt: skip


def _agreement(runtime: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean relative logit error of ``runtime`` against ``reference``."""
    top1 = float((runtime.argmax(1) == reference.argmax(1)).float().mean())
    error = float(((runtime - reference).norm(dim=1) / reference.norm(dim=1)).mean())
    return top1, error


class _Deployed:
    """Each deployment exported once per module: the tests share its session."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.made = folder, {}

    def __call__(self, name: str, source: nn.Module, calibration: torch.Tensor):
        if name not in self.made:
            deployment = create_deployment(name)
            path = self.folder / f"{name}.{deployment.suffix}"
            deployment.export(source, calibration, path)
            simulation = deployment.simulation(source, calibration, torch.device("cpu"))
            self.made[name] = (deployment, deployment.load(path), simulation)
        return self.made[name]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> _Deployed:
    return _Deployed(tmp_path_factory.mktemp("deployments"))


def _check(name: str, source: nn.Module, fp32: nn.Module, calibration, images, deployed):
    deployment, runtime, simulation = deployed(name, source, calibration)
    with torch.no_grad():
        logits = runtime(images)
        simulated, float_logits = simulation(images), fp32(images)
    assert logits.shape == (len(images), 10) and logits.dtype == torch.float32
    json.dumps(deployment.fingerprint())  # part of a cache key
    assert deployment.spec(QuantSpec(8, 8)).weight_bits == 8
    return _agreement(logits, simulated), _agreement(logits, float_logits)


@pytest.mark.parametrize("name", PTQ)
def test_ptq_runtime_agrees_with_its_simulation(name: str, lenet, deployed) -> None:
    model, calibration, images = lenet
    (top1, error), (fp32_top1, fp32_error) = _check(
        name, model, model, calibration, images, deployed
    )
    print(f"{name}: simulation {top1:.3f} ({error:.2e}), fp32 {fp32_top1:.3f} ({fp32_error:.2e})")
    assert top1 >= 0.97
    assert top1 >= fp32_top1
    assert error < fp32_error / 5  # the simulation predicts the integer logits, fp32 does not


@pytest.mark.parametrize("name", QAT)
def test_qat_runtime_agrees_with_the_trained_model(name: str, lenet, qat_w8a8, deployed) -> None:
    model, calibration, images = lenet
    (top1, error), (fp32_top1, fp32_error) = _check(
        name, qat_w8a8, model, calibration, images, deployed
    )
    print(f"{name}: simulation {top1:.3f} ({error:.2e}), fp32 {fp32_top1:.3f} ({fp32_error:.2e})")
    assert top1 >= 0.97
    assert top1 >= fp32_top1
    assert error < fp32_error / 5


@pytest.mark.parametrize("name", _each("openvino-int8", "executorch-int8", "litert-int8"))
def test_a_query_attack_succeeds_on_the_runtime(name: str, lab, lenet, deployed) -> None:
    """Sparse-RS crafts on the session itself (any batch size: the static-shape runtimes split)."""
    from quantpatch.attacks import create_attack
    from quantpatch.metrics import attack_success

    model, calibration, _ = lenet
    _, runtime, _ = deployed(name, model, calibration)
    x, y = lab.images[:24], lab.labels[:24]
    attack = create_attack("sparse-rs", patch_size=8, queries=150, progress=False)
    adversarial = attack.perturb([runtime], x, y, torch.device("cpu"))
    with torch.no_grad():
        clean, attacked = runtime(x).argmax(1), runtime(adversarial).argmax(1)
    rate = attack_success(clean, attacked, y)
    print(f"{name}: sparse-rs {rate}")
    assert rate.rate >= 0.5, rate


@_needs("openvino-int8")
def test_openvino_runs_int8_kernels_and_its_fp32_null_in_float(lenet, deployed, tmp_path) -> None:
    model, calibration, images = lenet
    deployment, int8, _ = deployed("openvino-int8", model, calibration)
    deployment.export_fp32(model, images, tmp_path / "fp32.ovir")
    fp32 = deployment.load(tmp_path / "fp32.ovir")
    assert int8.kernels() == {"int8": 4, "float": 0}  # lenet's two convs and two linears
    assert fp32.kernels() == {"int8": 0, "float": 4}
    with torch.no_grad():
        assert torch.allclose(fp32(images), model(images), atol=1e-4)


@_needs("openvino-w8a8")
def test_openvino_runs_the_qat_model_on_int8_kernels(lenet, qat_w8a8, deployed) -> None:
    _, calibration, _ = lenet
    _, runtime, _ = deployed("openvino-w8a8", qat_w8a8, calibration)
    assert runtime.kernels() == {"int8": 4, "float": 0}


@_needs("openvino-int8")
def test_pt2e_simulation_gives_input_gradients(lenet, deployed) -> None:
    model, calibration, images = lenet
    _, _, simulation = deployed("openvino-int8", model, calibration)
    x = images[:16].clone().requires_grad_(True)
    simulation(x).logsumexp(1).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    tensors = {**dict(simulation.named_buffers()), **dict(simulation.named_parameters())}
    constants = [n.target for n in simulation.graph.nodes if n.op == "get_attr"]
    assert constants and all(c in tensors for c in constants)  # so .to(device) moves them
    simulation.train()  # a plain GraphModule: train/eval work (exported modules refuse them)
    assert not any(isinstance(m, FakeQuantizer) and m.learnable for m in simulation.modules())


@_needs("executorch-int8")
def test_executorch_splits_any_batch_over_its_static_methods(lenet, deployed) -> None:
    model, calibration, images = lenet
    _, runtime, _ = deployed("executorch-int8", model, calibration)
    assert runtime.batch_sizes == (64, 8, 1)
    x = images[:75]  # 64 + 8 + 3 x 1
    one_by_one = torch.cat([runtime(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(runtime(x), one_by_one)  # integer kernels: the batch changes nothing


# -- no runtime needed ------------------------------------------------------------------------------


class _QuantDequant(nn.Module):
    """A hand-written PT2E-style graph: conv on int8-rounded input, uint8-rounded output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        q = ops.quantize_per_tensor(x, 0.01, -3, -128, 127, torch.int8)
        x = ops.dequantize_per_tensor(q, 0.01, -3, -128, 127, torch.int8)
        y = torch.relu(self.conv(x))
        q = ops.quantize_per_tensor(y, 0.02, 0, 0, 255, torch.uint8)
        return ops.dequantize_per_tensor(q, 0.02, 0, 0, 255, torch.uint8)


def test_fake_quant_graph_keeps_the_rounding_and_adds_gradients() -> None:
    graph = fx.symbolic_trace(_QuantDequant())
    simulation = fake_quant_graph(graph)
    quantizers = [m for m in simulation.modules() if isinstance(m, FakeQuantizer)]
    assert len(quantizers) == 2
    assert "quantize_per_tensor" not in simulation.code
    x = torch.rand(8, 1, 10, 10) * 2 - 1
    with torch.no_grad():
        assert torch.equal(simulation(x), graph(x))
    x.requires_grad_(True)
    simulation(x).sum().backward()
    assert float(x.grad.abs().sum()) > 0


class _DoubleRounding(nn.Module):
    """A linear output rounded, then its ReLU rounded again (LiteRT's quantizer does this)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        q = ops.quantize_per_tensor(x, 0.3, 5, -128, 127, torch.int8)
        y = torch.relu(ops.dequantize_per_tensor(q, 0.3, 5, -128, 127, torch.int8))
        q = ops.quantize_per_tensor(y, 0.01, -128, -128, 127, torch.int8)
        return ops.dequantize_per_tensor(q, 0.01, -128, -128, 127, torch.int8)


def test_fused_relu_keeps_only_the_second_rounding() -> None:
    graph = fx.symbolic_trace(_DoubleRounding())
    plain, fused = fake_quant_graph(graph), fake_quant_graph(graph, fuse_relu=True)
    count = [sum(isinstance(m, FakeQuantizer) for m in g.modules()) for g in (plain, fused)]
    assert count == [2, 1]
    x = torch.linspace(-2, 3, 101).reshape(1, 1, 1, -1)
    once = torch.fake_quantize_per_tensor_affine(torch.relu(x), 0.01, -128, -128, 127)
    with torch.no_grad():
        assert torch.equal(fused(x), once)
        assert torch.equal(plain(x), graph(x))
        assert not torch.equal(plain(x), once)  # the first, coarser grid changes values


def test_fake_quant_graph_refuses_a_quantize_without_its_dequantize() -> None:
    class Dangling(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = torch.ops.quantized_decomposed.quantize_per_tensor(x, 0.1, 0, -128, 127, torch.int8)
            return q.float()

    with pytest.raises(InvalidSpecError, match="not followed by its dequantize"):
        fake_quant_graph(fx.symbolic_trace(Dangling()))


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS.names()))
def test_a_missing_runtime_is_refused_in_one_line(name: str, monkeypatch) -> None:
    deployment = DEPLOYMENTS.get(name)
    missing = deployment.modules[0]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda m, *a: None if m == missing else real(m, *a)
    )
    with pytest.raises(ConfigError) as error:
        create_deployment(name)
    message = str(error.value)
    assert "\n" not in message and f"'{name}' needs {missing}" in message
    if deployment.extra:
        assert f"quantpatch[{deployment.extra}]" in message


def test_new_runtimes_are_registered_on_the_core_install() -> None:
    """Registration imports no runtime: the optional ones are listed even where missing."""
    extras = {"openvino-int8": "openvino", "openvino-w8a8": "openvino",
              "executorch-int8": "executorch", "litert-int8": "litert"}  # fmt: skip
    assert {name: DEPLOYMENTS.get(name).extra for name in extras} == extras
