"""The vectorised fake-quant path and the cached frozen weights equal PyTorch's native ops
bit for bit: op by op on crafted values, and on zoo models (outputs, input gradients, QAT
steps) against ``reference_fake_quant()``, the computation as it was before."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from quantpatch.models import create_model, fast_frozen_copy
from quantpatch.quant import (
    QuantSpec,
    calibrate,
    clear_weight_cache,
    ops,
    quant_layers,
    quantize,
    reference_fake_quant,
    set_learnable,
)
from quantpatch.quant.quantize import param_groups


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same shape, layout and bits (``torch.equal`` would accept -0.0 for 0.0)."""
    assert a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(_bits(a), _bits(b))


# -- op by op -------------------------------------------------------------------------------------

RANGES = [(0, 15, 0), (0, 255, 97), (0, 3, 2), (-7, 7, 0), (-127, 127, 0), (0, 1, 0), (-8, 7, 0)]


def crafted(scale: float, z: int, qmin: int, qmax: int, shape: tuple, seed: int) -> torch.Tensor:
    """Random values with exact and near ties of every code, both clamp ends, signed zeros
    and tiny values mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale * (qmax - qmin) * 0.6
    flat = x.view(-1)
    n = flat.numel() // 3
    codes = torch.randint(qmin - z - 2, qmax - z + 3, (n,), generator=g).double()
    jitter = 1 + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 4e-7
    flat[:n] = ((codes + 0.5) * scale * jitter).float()
    flat[n : n + 6] = torch.tensor(
        [0.0, -0.0, -1e-30, 1e-30, (qmin - z) * scale, (qmax - z) * scale]
    )
    return x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("qmin", "qmax", "z"), RANGES)
def test_per_tensor_equals_native(qmin: int, qmax: int, z: int, channels_last: bool) -> None:
    for seed, scale in enumerate([0.0731, 1 / 3, 4.25, 2.3e-4]):
        x = crafted(scale, z, qmin, qmax, (16, 6, 5, 5), seed)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        if channels_last:
            x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
        s, zp = torch.tensor([scale]), torch.tensor([float(z)])
        results = []
        for reference in (True, False):
            xr = x.clone().requires_grad_(True)
            with ops.reference_fake_quant() if reference else torch.enable_grad():
                out = ops.fake_quantize_per_tensor(xr, s, zp, qmin, qmax)
                results.append((out, *torch.autograd.grad(out, xr, grad)))
        assert type(results[1][0].grad_fn).__name__ == "_PerTensorBackward"
        for native, fast in zip(*results, strict=True):
            assert_identical(native, fast)
        with torch.no_grad():  # the maskless path
            assert_identical(ops.fake_quantize_per_tensor(x, s, zp, qmin, qmax), results[0][0])


@pytest.mark.parametrize(("qmin", "qmax", "z"), [r for r in RANGES if r[0] <= 0 <= r[1]])
def test_learnable_per_tensor_equals_native(qmin: int, qmax: int, z: int) -> None:
    for seed, scale in enumerate([0.0731, 1 / 3, 4.25]):
        x = crafted(scale, z, qmin, qmax, (8, 4, 6, 6), seed)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        zp, factor = torch.tensor([float(z)]), 1 / math.sqrt(x[0].numel() * max(qmax, 1))
        results = []
        for reference in (True, False):
            xr, s = x.clone().requires_grad_(True), torch.tensor([scale], requires_grad=True)
            with ops.reference_fake_quant() if reference else torch.enable_grad():
                out = ops.fake_quantize_learnable_per_tensor(xr, s, zp, qmin, qmax, factor)
                results.append((out, *torch.autograd.grad(out, (xr, s), grad)))
        assert type(results[1][0].grad_fn).__name__ == "_LearnablePerTensorBackward"
        for native, fast in zip(*results, strict=True):
            assert_identical(native, fast)


def test_nan_inf_and_huge_values_follow_the_native_op() -> None:
    x = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30, 3e19, 0.2, -0.2])
    s, zp = torch.tensor([0.1]), torch.tensor([3.0])
    for learnable in (False, True):
        results = []
        for reference in (True, False):
            xr, sr = x.clone().requires_grad_(True), s.clone().requires_grad_(learnable)
            with ops.reference_fake_quant() if reference else torch.enable_grad():
                if learnable:
                    out = ops.fake_quantize_learnable_per_tensor(xr, sr, zp, -8, 7, 0.5)
                    grads = torch.autograd.grad(out, (xr, sr), torch.ones_like(x))
                else:
                    out = ops.fake_quantize_per_tensor(xr, sr, zp, 0, 15)
                    grads = torch.autograd.grad(out, xr, torch.ones_like(x))
            results.append((out, *grads))
        for native, fast in zip(*results, strict=True):
            assert_identical(native, fast)


def test_second_backward_through_a_retained_graph() -> None:
    x = crafted(0.05, 0, 0, 15, (4, 3, 5, 5), 0).requires_grad_(True)
    out = ops.fake_quantize_per_tensor(x, torch.tensor([0.05]), torch.tensor([0.0]), 0, 15)
    loss = (out * torch.arange(out.numel()).view(out.shape)).sum()
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert_identical(first, second)
    assert 0 < int((first == 0).sum()) < first.numel()  # some clipped, some passed through


def test_a_failed_probe_keeps_the_native_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_verified", False)
    x = torch.rand(2, 3, requires_grad=True)
    out = ops.fake_quantize_per_tensor(x, torch.tensor([0.1]), torch.tensor([0.0]), 0, 15)
    assert "Fake" in type(out.grad_fn).__name__  # the native op's backward node


def test_the_probe_passes_on_this_build() -> None:
    assert ops._probe()


# -- zoo models -----------------------------------------------------------------------------------

ATTACK_CASES = [  # (model, precision, also on its attack copy): every family, three widths
    ("lenet", "w8a8", True),
    ("lenet", "w4a4", True),
    ("lenet", "w2a2", True),
    ("resnet20", "w4a4", True),
    ("resnet20", "w2a2", False),
    ("mobilenetv2", "w4a4", False),
    ("vit_tiny", "w8a8", True),
]


def _quantized(name: str, spec: str, images: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10, image_size=28).eval()
    qmodel = quantize(model, QuantSpec.parse(spec))
    calibrate(qmodel, images, "minmax", "cpu")
    return qmodel.eval().requires_grad_(False)


def _forward_backward(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    x = images.clone().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), x)
    return logits.detach(), grad


@pytest.mark.parametrize(("name", "spec", "attack_copy"), ATTACK_CASES)
def test_attack_passes_equal_the_reference(name: str, spec: str, attack_copy: bool) -> None:
    """Logits and input gradients, on the model and on its attack copy (channels-last, BN
    folded), twice in a row (the second pass reads the cached weights)."""
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4) % 10
    qmodel = _quantized(name, spec, images)
    for model in (qmodel, fast_frozen_copy(qmodel)) if attack_copy else (qmodel,):
        with reference_fake_quant():
            reference = _forward_backward(model, images, labels)
        for _ in range(2):
            for expected, got in zip(
                reference, _forward_backward(model, images, labels), strict=True
            ):
                assert_identical(expected, got)


@pytest.mark.parametrize(("name", "spec"), [("lenet", "w4a4"), ("resnet20", "w2a2")])
def test_qat_steps_equal_the_reference(name: str, spec: str) -> None:
    """Two LSQ training steps (weights, scales, BatchNorm statistics) end bit-identical."""
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(4) % 10
    trained = []
    for reference in (True, False):
        model = _quantized(name, spec, images).requires_grad_(True)
        set_learnable(model, True)
        model.train()
        optimizer = torch.optim.SGD(param_groups(model), lr=0.05, momentum=0.9)
        with reference_fake_quant() if reference else torch.enable_grad():
            for _ in range(2):
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        trained.append(model.state_dict())
    assert trained[0].keys() == trained[1].keys()
    for key, value in trained[0].items():
        assert torch.equal(value, trained[1][key]), key


# -- the weight cache -----------------------------------------------------------------------------


def _layer() -> tuple[torch.nn.Module, torch.nn.Module]:
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    model = _quantized("lenet", "w4a4", images)
    return model, next(quant_layers(model))[1]


def test_frozen_weights_are_quantized_once() -> None:
    _, layer = _layer()
    first = layer.quantized_weight()
    assert layer.quantized_weight() is first
    assert_identical(first, layer.weight_quant(layer.weight))
    with reference_fake_quant():
        assert layer.quantized_weight() is not first


def test_the_cache_follows_weight_and_scale_changes() -> None:
    model, layer = _layer()
    first = layer.quantized_weight()
    with torch.no_grad():
        layer.weight.mul_(0.5)
    second = layer.quantized_weight()
    assert second is not first
    assert_identical(second, layer.weight_quant(layer.weight))
    with torch.no_grad():
        layer.weight_quant.scale.mul_(2.0)
    third = layer.quantized_weight()
    assert third is not second and torch.equal(third, layer.weight_quant(layer.weight))
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        layer.weight.add_(1.0)
    layer.quantized_weight()
    model.load_state_dict(state)
    assert_identical(layer.quantized_weight(), third)
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 3, requires_grad=False)
    assert torch.equal(layer.quantized_weight(), layer.weight_quant(layer.weight))
    clear_weight_cache(model)
    assert "_weight_cache" not in layer.__dict__


def test_no_cache_while_weights_train_or_in_inference_mode() -> None:
    model, layer = _layer()
    model.requires_grad_(True)
    out = layer.quantized_weight()
    assert out.requires_grad and "_weight_cache" not in layer.__dict__
    with torch.inference_mode():
        layer.quantized_weight()
    assert "_weight_cache" not in layer.__dict__
    with torch.no_grad():  # evaluation during training: cached until the next step writes
        assert layer.quantized_weight() is layer.quantized_weight()


def test_copies_and_pickles_leave_the_cache_behind() -> None:
    model, layer = _layer()
    layer.quantized_weight()
    assert "_weight_cache" in layer.__dict__
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        twin = next(quant_layers(clone))[1]
        assert "_weight_cache" not in twin.__dict__
        assert torch.equal(twin.quantized_weight(), layer.quantized_weight())
