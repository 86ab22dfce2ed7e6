"""quantpatch.quant: QuantSpec names, native fake-quant layers, quantize/calibrate, LSQ QAT."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantpatch.data import Split
from quantpatch.errors import InvalidSpecError, UnknownNameError
from quantpatch.quant import (
    CALIBRATIONS,
    FP32,
    GRIDS,
    FakeQuantizer,
    QuantConv2d,
    QuantizerSpec,
    QuantLinear,
    QuantMultiheadAttention,
    QuantSpec,
    build_quantized,
    calibrate,
    freeze_weights,
    quant_layers,
    quantizable_layers,
    quantize,
    set_learnable,
)
from quantpatch.quant.layers import init_weight_quantizer

# -- QuantSpec ------------------------------------------------------------------------------------


def _takes(grid: str, nbits: int | None) -> bool:
    """Whether the weight grid ``grid`` exists at ``nbits`` (float weights take any grid)."""
    if nbits is None:
        return True
    try:
        GRIDS.get(grid)(nbits)
    except InvalidSpecError:
        return False
    return True


bits = st.one_of(st.none(), st.integers(1, 8))


@st.composite
def specs(draw: st.DrawFn) -> QuantSpec:
    grid = draw(st.sampled_from(GRIDS.names()))
    return QuantSpec(
        weight_bits=draw(bits.filter(lambda b: _takes(grid, b))),
        act_bits=draw(bits),
        per_channel=draw(st.booleans()),
        method=draw(st.sampled_from(["ptq", "qat"])),
        weight_grid=grid,
    )


@settings(max_examples=300, derandomize=True, deadline=None)
@given(specs())
def test_name_parse_round_trip(spec: QuantSpec) -> None:
    assert QuantSpec.parse(spec.name) == spec
    assert QuantSpec.parse(spec.name.upper()) == spec
    assert str(spec) == spec.name
    assert hash(QuantSpec.parse(spec.name)) == hash(spec)


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        (QuantSpec(None, None), "fp32"),
        (QuantSpec(8, 8), "w8a8"),
        (QuantSpec(4, 4), "w4a4"),
        (QuantSpec(2, 2), "w2a2"),
        (QuantSpec(4, 8), "w4a8"),
        (QuantSpec(2, None), "w2a32"),
        (QuantSpec(None, 8), "w32a8"),
        (QuantSpec(8, 8, method="ptq"), "w8a8-ptq"),
        (QuantSpec(4, 4, per_channel=False, weight_grid="asym"), "w4a4-pt-asym"),
        (QuantSpec(4, 4, weight_grid="asym"), "w4a4-asym"),
        (QuantSpec(1, 1), "w1a1"),
    ],
)
def test_short_names(spec: QuantSpec, name: str) -> None:
    assert spec.name == name
    assert QuantSpec.parse(name) == spec


def test_parse_aliases_and_float() -> None:
    assert QuantSpec.parse("float") == FP32 == QuantSpec.parse(" FP32 ")
    assert QuantSpec.parse("w32a32") == FP32
    assert QuantSpec.parse("W4A4-QAT") == QuantSpec(4, 4)
    assert QuantSpec.parse("w8a8-PTQ").method == "ptq"
    assert FP32.is_float and not QuantSpec(8, None).is_float
    # settings that cannot matter are normalised, so equal behaviour means equal values
    assert QuantSpec(None, None, method="ptq", per_channel=False) == FP32


@pytest.mark.parametrize(
    "text",
    [
        "w33a8",
        "w0a0",
        "garbage",
        "",
        "w4",
        "a4w4",
        "w9a9",
        "w16a16",
        "w08a8",
        "w4a4-foo",
        "w4a4-ptq-qat",
        "w4a4-ptq-ptq",
        "w-1a4",
    ],
)
def test_parse_rejects_invalid(text: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        QuantSpec.parse(text)
    message = str(info.value)
    assert "\n" not in message
    assert repr(text) in message


def test_parse_message_lists_accepted_form() -> None:
    with pytest.raises(InvalidSpecError, match=r"'fp32' or 'w<bits>a<bits>.*bits 1-8 or 32"):
        QuantSpec.parse("w33a8")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_bits": 0, "act_bits": 8},
        {"weight_bits": 9, "act_bits": None},
        {"weight_bits": 4, "act_bits": 33},
        {"weight_bits": True, "act_bits": 8},
        {"weight_bits": 4.0, "act_bits": 4},
        {"weight_bits": 4, "act_bits": 4, "method": "dynamic"},
        {"weight_bits": 4, "act_bits": 4, "weight_grid": "nope"},
        {"weight_bits": 4, "act_bits": 4, "per_channel": None},
    ],
)
def test_constructor_validates(kwargs: dict) -> None:
    with pytest.raises(InvalidSpecError):
        QuantSpec(**kwargs)


def test_spec_is_frozen_and_hashable() -> None:
    cache = {QuantSpec(4, 4): "a", FP32: "b", QuantSpec(4, 4, method="ptq"): "c"}
    assert cache[QuantSpec.parse("w4a4")] == "a"
    assert cache[QuantSpec.parse("float")] == "b"
    assert len(cache) == 3
    with pytest.raises(AttributeError):
        QuantSpec(4, 4).weight_bits = 8  # type: ignore[misc]


# -- FakeQuantizer / layers -------------------------------------------------------------------------


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    """Names of every autograd node behind ``t``."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node.name() in seen:
            continue
        seen.add(node.name())
        stack.extend(fn for fn, _ in node.next_functions)
    return seen


def _unclipped(x: torch.Tensor, q: FakeQuantizer) -> torch.Tensor:
    """Where the integer code round(x / s) + zp lies inside the grid (native STE mask)."""
    code = torch.round(x.detach() / q.scale.detach()) + q.zero_point
    return (code >= q.grid.qmin) & (code <= q.grid.qmax)


W4A4 = QuantSpec(4, 4)


def test_straight_through_gradient_elementwise() -> None:
    q = FakeQuantizer(QuantizerSpec(4).make_grid())
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.linspace(-2, 2, 401, requires_grad=True)
    (grad,) = torch.autograd.grad(q(x).sum(), x)
    inside = _unclipped(x, q)
    assert inside.any() and (~inside).any()
    assert torch.equal(grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(grad[~inside], torch.zeros(int((~inside).sum())))


@pytest.mark.parametrize("learnable", [False, True])
def test_layer_input_gradient_is_float_gradient_where_not_clipped(learnable: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer = QuantConv2d.from_float(conv, weight_spec=W4A4.weights, act_spec=W4A4.activations)
    layer.act_quant.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    layer.act_quant.set_learnable(learnable)
    layer.weight_quant.set_learnable(learnable)
    x = (torch.randn(4, 3, 8, 8) * 0.8).requires_grad_(True)
    out = layer(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)

    # reference: the float conv on the already-quantized input and weight
    xq = layer.act_quant(x).detach().requires_grad_(True)
    ref_out = nn.functional.conv2d(xq, layer.quantized_weight().detach(), conv.bias, padding=1)
    (ref,) = torch.autograd.grad(ref_out.square().sum(), xq)
    inside = _unclipped(x, layer.act_quant)
    assert (~inside).any() and grad.abs().sum() > 0
    torch.testing.assert_close(grad[inside], ref[inside])
    assert torch.all(grad[~inside] == 0)
    kind = "Learnable" if learnable else "Cachemask"
    assert any(kind in name for name in _grad_fn_names(out))


def test_frozen_scales_use_cheap_op_and_learnable_scales_get_gradients() -> None:
    layer = QuantLinear.from_float(
        nn.Linear(16, 4), weight_spec=W4A4.weights, act_spec=W4A4.activations
    )
    x = torch.randn(8, 16, requires_grad=True)
    names = _grad_fn_names(layer(x))
    assert not any("Learnable" in n for n in names)
    assert layer.act_quant.scale.grad is None
    set_learnable(layer, True)
    layer(x).square().sum().backward()
    assert any("Learnable" in n for n in _grad_fn_names(layer(x)))
    assert layer.act_quant.scale.grad is not None and layer.act_quant.scale.grad.abs().sum() > 0
    assert layer.weight_quant.scale.grad.abs().sum() > 0
    set_learnable(layer, False)
    assert not layer.act_quant.learnable and not layer.weight_quant.scale.requires_grad


@pytest.mark.parametrize("nbits", range(1, 9))
@pytest.mark.parametrize("grid", GRIDS.names())
def test_weight_levels_per_channel(nbits: int, grid: str) -> None:
    if not _takes(grid, nbits):
        pytest.skip(f"grid {grid} has no {nbits}-bit form")
    torch.manual_seed(nbits)
    weight = torch.randn(6, 3, 5, 5) * torch.linspace(0.1, 2.0, 6).view(6, 1, 1, 1)
    q = FakeQuantizer(GRIDS.get(grid)(nbits), channels=6)
    init_weight_quantizer(q, weight)
    out = q(weight)
    for c in range(6):
        levels = out[c].unique()
        assert 2 <= len(levels) <= q.grid.qmax - q.grid.qmin + 1 <= 2**nbits
    if nbits == 1 and grid == "narrow":  # binary {-a, +a}, a = mean|w|, sign kept
        a = weight.abs().mean(dim=(1, 2, 3)).view(6, 1, 1, 1)
        torch.testing.assert_close(out, torch.sign(weight) * a)


@pytest.mark.parametrize("method", CALIBRATIONS.names())
def test_full_range_2bit_weights_take_four_levels_where_narrow_takes_three(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 8, 5))  # 400 weights per output channel
    x = torch.rand(4, 16, 8, 8)
    levels = {}
    for name in ("w2a2", "w2a2-full"):
        spec = QuantSpec.parse(name)
        assert spec.name == name and QuantSpec.parse(spec.name) == spec
        q = calibrate(quantize(model, spec, first_last_bits=None), x, method, "cpu")
        weight = q[0].quantized_weight().detach()
        levels[name] = {len(weight[c].unique()) for c in range(8)}
    assert levels == {"w2a2": {3}, "w2a2-full": {4}}
    with pytest.raises(InvalidSpecError, match="w1a1-full"):
        QuantSpec.parse("w1a1-full")


@pytest.mark.parametrize("nbits", range(1, 9))
def test_activation_levels_per_tensor(nbits: int) -> None:
    q = FakeQuantizer(QuantizerSpec(nbits).make_grid())
    x = torch.randn(4096)
    q.set_range(x.min(), x.max())
    out = q(x)
    assert 2 <= len(out.unique()) <= 2**nbits
    # the integer zero point may shift the grid by up to half a step either way
    step = float(q.scale)
    assert out.min() >= x.min() - step and out.max() <= x.max() + step


def test_binary_gradient_flows() -> None:
    w1a1 = QuantSpec(1, 1)
    layer = QuantConv2d.from_float(
        nn.Conv2d(2, 4, 3), weight_spec=w1a1.weights, act_spec=w1a1.activations
    )
    x = torch.rand(2, 2, 6, 6, requires_grad=True)
    layer.act_quant.set_range(torch.tensor(0.0), torch.tensor(1.0))
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    assert grad.abs().sum() > 0
    assert len(layer.quantized_weight()[0].unique()) == 2


# -- quantize / calibrate ------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.body(self.stem(x * 2 - 1))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def test_quantize_swaps_layers_and_keeps_first_last_at_8_bit() -> None:
    model = TinyNet()
    q = quantize(model, QuantSpec(2, 2))
    assert q.quant_spec == QuantSpec(2, 2)
    assert isinstance(q.stem, QuantConv2d) and isinstance(q.fc2, QuantLinear)
    assert all(
        isinstance(m, (QuantConv2d, QuantLinear))
        for m in q.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    bits = {n: (m.weight_bits, m.act_bits) for n, m in q.named_modules() if hasattr(m, "act_quant")}
    assert bits == {"stem": (8, 8), "body.1": (2, 2), "fc1": (2, 2), "fc2": (8, 8)}
    assert type(model.stem) is nn.Conv2d  # the original is untouched
    assert q.stem.weight is not model.stem.weight
    torch.testing.assert_close(q.stem.weight, model.stem.weight)

    same = quantize(model, QuantSpec(2, 2), first_last_bits=None)
    assert (same.stem.weight_bits, same.fc2.act_bits) == (2, 2)
    weights_only = quantize(model, QuantSpec.parse("w4a32"))
    assert weights_only.fc1.act_quant is None and weights_only.fc1.weight_bits == 4
    assert weights_only.stem.act_quant is None and weights_only.stem.weight_bits == 8
    with pytest.raises(InvalidSpecError):
        quantize(model, QuantSpec(4, 4), first_last_bits=0)


def test_fp32_quantize_is_a_plain_copy() -> None:
    model = TinyNet()
    q = quantize(model, FP32)
    assert q is not model and q.quant_spec == FP32
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in q.modules())
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(q(x), model(x))
    from quantpatch.data import Split

    built = build_quantized(model.train(), FP32, Split(x, torch.tensor([0, 1])), device="cpu")
    assert built is not model and not built.training and model.training
    torch.testing.assert_close(built(x), model.eval()(x))


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.rand(16, 1, 8, 8)
    q = calibrate(quantize(model, QuantSpec(4, 4)), x, "mse", "cpu")
    state = q.state_dict()
    assert set(model.state_dict()) <= set(state)
    assert "fc1.act_quant.scale" in state and "body.1.weight_quant.zero_point" in state
    fresh = quantize(TinyNet(), QuantSpec(4, 4))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), q(x))


def test_frozen_weights_give_the_same_outputs_and_gradients_and_follow_changes() -> None:
    """An attack copy quantizes its weights once: outputs and input gradients stay bit-exact,
    the weight quantizers stop running, nothing is saved, and a later change to a weight or
    its scale, training switched on, another quantizer or a trace never gets a stale one."""
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    q = calibrate(quantize(TinyNet(), QuantSpec(4, 4)), x, "minmax", "cpu").eval()
    frozen = freeze_weights(copy.deepcopy(q).requires_grad_(False))
    assert all(layer.frozen_weight is not None for _, layer in quant_layers(frozen))
    assert set(frozen.state_dict()) == set(q.state_dict())

    def output_and_gradient(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = x.clone().requires_grad_(True)
        out = model(inputs)
        return out, torch.autograd.grad(out.square().sum(), inputs)[0]

    for got, want in zip(output_and_gradient(frozen), output_and_gradient(q), strict=True):
        assert torch.equal(got, want)
    with torch.inference_mode():  # frozen in grad mode, used in inference mode and back
        assert torch.equal(frozen(x), q(x))
    calls = []
    for _, layer in quant_layers(frozen):
        layer.weight_quant.register_forward_hook(lambda *_: calls.append(1))
    frozen(x)
    assert not calls  # the weight quantizers no longer run

    layer = frozen.fc1
    with torch.no_grad():
        layer.weight.mul_(2)
    assert torch.equal(layer.quantized_weight(), layer.weight_quant(layer.weight))
    layer.freeze_weight()
    with torch.no_grad():
        layer.weight_quant.scale.mul_(3)
    assert torch.equal(layer.quantized_weight(), layer.weight_quant(layer.weight))
    layer.freeze_weight()
    layer.weight.requires_grad_(True)  # training switched on after freezing: the graph is back
    assert layer.quantized_weight().grad_fn is not None
    layer.frozen_weight = None
    layer.freeze_weight()  # a weight being trained is never frozen
    assert layer.frozen_weight is None
    layer.weight.requires_grad_(False)
    set_learnable(layer, True)  # nor is one whose scale trains
    layer.freeze_weight()
    assert layer.frozen_weight is None
    set_learnable(layer, False)
    layer.freeze_weight()
    layer.weight_quant = copy.deepcopy(layer.weight_quant)  # another quantizer, equal values
    assert layer.quantized_weight() is not layer.frozen_weight
    with warnings.catch_warnings():  # the trace notes Python branches: expected here
        warnings.simplefilter("ignore")  # and its deprecation notice
        graph = str(torch.jit.trace(frozen, x).inlined_graph)  # a traced graph keeps every
    ops = graph.count("aten::fake_quantize_per_channel_affine")  # weight quantizer's op
    assert ops == len(list(quant_layers(frozen))) == 4


def test_calibrate_sets_sane_scales() -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.rand(300, 1, 8, 8)
    q = calibrate(quantize(model, QuantSpec(8, 8)), x, "minmax", "cpu", batch_size=64)
    # stem input is x*2-1 in [-1, 1]: asymmetric grid with the zero point near the middle
    stem = q.stem.act_quant
    low, high = (
        -float(stem.zero_point) * float(stem.scale),
        (255 - float(stem.zero_point)) * float(stem.scale),
    )
    assert low == pytest.approx(float((x * 2 - 1).min()), abs=2 * float(stem.scale))
    assert high == pytest.approx(float((x * 2 - 1).max()), abs=2 * float(stem.scale))
    # post-ReLU inputs are non-negative: zero point 0, scale = max / 255
    seen = {}
    hook = q.body[1].register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        q.body[1].act_quant.enabled = False
        q(x)
        q.body[1].act_quant.enabled = True
    hook.remove()
    assert float(q.body[1].act_quant.zero_point) == 0
    assert float(q.body[1].act_quant.scale) == pytest.approx(float(seen["x"].max()) / 255, rel=0.05)
    # weights: per-channel max / 127
    w = q.body[1].weight.detach()
    torch.testing.assert_close(q.body[1].weight_quant.scale, w.abs().amax(dim=(1, 2, 3)) / 127)
    # that no method widens the min-max range is a registry contract (test_quant_registries)
    # a calibrated w8a8 model stays close to the float model
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_build_quantized_calibrates_on_the_images_it_is_given() -> None:
    """A caller hands ORT and the simulation the same calibration images."""
    torch.manual_seed(0)
    model, x = TinyNet().eval(), torch.rand(64, 1, 8, 8)
    train = Split(torch.rand(32, 1, 8, 8), torch.zeros(32, dtype=torch.long))
    spec = QuantSpec.parse("w8a8-ptq")
    built = build_quantized(
        model, spec, train, calibration="minmax", calibration_images=x, device="cpu"
    )
    expected = calibrate(quantize(model, spec), x, "minmax", "cpu")
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in built.state_dict().items())
    drawn = build_quantized(model, spec, train, calibration="minmax", device="cpu")  # train draw
    assert not torch.equal(drawn.stem.act_quant.scale, built.stem.act_quant.scale)


# -- nn.MultiheadAttention ------------------------------------------------------------------------


def _attention_cases() -> list:
    """(batch_first, self-attention, attn_mask, key_padding_mask) covering torch's options."""
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = may not attend
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    return [
        pytest.param(True, True, None, None, id="self"),
        pytest.param(True, True, causal, padding, id="self-bool-masks"),
        pytest.param(False, False, torch.randn(2 * 4, 5, 5), padding.float() * -1e4, id="cross"),
    ]


@pytest.mark.parametrize(("batch_first", "self_attn", "attn_mask", "padding"), _attention_cases())
def test_quantized_attention_computes_torch_attention(
    batch_first: bool, self_attn: bool, attn_mask, padding
) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    q = QuantMultiheadAttention.from_float(mha, weight_spec=None, act_spec=None)
    shape = (2, 5, 16) if batch_first else (5, 2, 16)
    query = torch.randn(shape)
    key = query if self_attn else torch.randn(shape)
    value = key
    for average in (True, False):
        kwargs = {"attn_mask": attn_mask, "key_padding_mask": padding}
        expected = mha(query, key, value, average_attn_weights=average, **kwargs)
        got = q(query, key, value, average_attn_weights=average, **kwargs)
        for e, g in zip(expected, got, strict=True):  # output and attention weights
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    out, weights = q(query, key, value, need_weights=False)
    assert weights is None and out.shape == shape


def test_quantize_reaches_torchvision_attention() -> None:
    """tv: transformers (VisionTransformer, as tv:vit_b_16) quantize attention too."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=3,
    ).eval()  # fmt: skip
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero
    x = torch.rand(8, 3, 16, 16)
    q = calibrate(quantize(vit, QuantSpec(8, 8)), x, "minmax", "cpu")
    assert not any(isinstance(m, nn.MultiheadAttention) for m in q.modules())
    assert quantizable_layers(q) == []  # no float Conv2d/Linear left, projections included
    attention = [m for m in q.modules() if isinstance(m, QuantMultiheadAttention)]
    assert len(attention) == 2
    for m in attention:
        assert m.in_proj.act_quant.initialized and m.out_proj.act_quant.initialized
        assert m.in_proj.weight_bits == m.out_proj.weight_bits == 8
    with torch.no_grad():
        ref, out = vit(x), q(x)
    assert not torch.equal(out, ref)
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_quantize_refuses_attention_it_cannot_compute() -> None:
    model = nn.Sequential(nn.Linear(4, 8))
    model.add_module("attn", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(InvalidSpecError, match="layer 'attn': cannot quantize"):
        quantize(model, QuantSpec(8, 8))


def test_calibrate_rejects_unknown_method() -> None:
    with pytest.raises(UnknownNameError, match="calibration method 'kl'.*minmax, mse, percentile"):
        calibrate(quantize(TinyNet(), QuantSpec(8, 8)), torch.rand(4, 1, 8, 8), "kl", "cpu")


# -- end to end on mnist5k (one trained fp32 LeNet shared by every test below) -------------------

QAT_TRAIN = {"epochs": 1, "lr": 0.01, "batch_size": 64, "seed": 0}
QAT_IMAGES = 2000  # one QAT epoch on half the train split keeps the test fast


@pytest.fixture(scope="module")
def mnist_lenet(mnist_lenet_fp32):
    """(dataset, trained fp32 LeNet, its test accuracy), from the session fixture in conftest."""
    from quantpatch.models import evaluate_accuracy

    ds, model = mnist_lenet_fp32
    return ds, model, evaluate_accuracy(model, ds.test, "cpu").rate


@pytest.mark.slow
def test_end_to_end_accuracy(mnist_lenet) -> None:
    from quantpatch.models import TrainConfig, evaluate_accuracy

    ds, fp32, fp32_acc = mnist_lenet
    before = copy.deepcopy(fp32.state_dict())
    assert fp32_acc >= 0.95
    results = {}
    for name in ("w8a8-ptq", "w4a4", "w2a2"):
        spec = QuantSpec.parse(name)
        train = ds.train.head(QAT_IMAGES)
        q = build_quantized(
            fp32, spec, train, qat=TrainConfig(**QAT_TRAIN), device="cpu", progress=False
        )
        results[name] = evaluate_accuracy(q, ds.test, "cpu").rate
        assert q.quant_spec == spec and not q.training
        scales = [m.scale for m in q.modules() if isinstance(m, FakeQuantizer)]
        assert scales and not any(s.requires_grad for s in scales)  # back on the cheap op
        if name == "w2a2":  # usable for attacks: finite, non-zero input gradients through STE
            x = ds.test.images[:32].clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(q(x), ds.test.labels[:32])
            (grad,) = torch.autograd.grad(loss, x)
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    print(f"accuracy fp32 {fp32_acc:.3f} {results}")
    assert results["w8a8-ptq"] >= fp32_acc - 0.01
    assert results["w4a4"] >= fp32_acc - 0.03
    assert results["w2a2"] >= fp32_acc - 0.03
    for key, value in fp32.state_dict().items():  # build_quantized never touches its input
        assert torch.equal(value, before[key])
