"""Every registered quantizer grid and calibration method, tested for free by iterating the
registries: a new entry must satisfy the same contracts as the built-in ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantpatch.errors import InvalidSpecError, UnknownNameError
from quantpatch.quant import (
    CALIBRATIONS,
    GRIDS,
    FakeQuantizer,
    QuantizerSpec,
    QuantSpec,
    calibrate,
    quantize,
    set_learnable,
)
from quantpatch.quant.grids import DEFAULT_WEIGHT_GRID, Grid
from quantpatch.quant.layers import init_weight_quantizer


def _takes(name: str, bits: int) -> bool:
    try:
        GRIDS.get(name)(bits)
    except InvalidSpecError:
        return False
    return True


def _grids() -> list[Grid]:
    """Every registered grid at every bit-width it takes."""
    return [GRIDS.get(n)(b) for n in GRIDS.names() for b in range(1, 9) if _takes(n, b)]


GRID_CASES = [pytest.param(g, id=f"{type(g).__name__}-{g.bits}") for g in _grids()]


# -- grids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRIDS.names())
def test_grid_name_is_a_spec_suffix_that_round_trips(name: str) -> None:
    taken = [bits for bits in range(1, 9) if _takes(name, bits)]
    assert taken, f"grid {name} takes no bit-width"
    spec = QuantSpec(taken[-1], 4, weight_grid=name)
    assert spec.name.endswith("" if name == DEFAULT_WEIGHT_GRID else f"-{name}")
    assert QuantSpec.parse(spec.name) == spec
    # the suffix selects this grid and nothing else (e.g. not per-tensor or PTQ)
    assert QuantSpec.parse(f"w{taken[-1]}a4-{name}") == spec
    for bits in set(range(1, 9)) - set(taken):  # a grid refuses widths it has no form for
        with pytest.raises(InvalidSpecError, match=f"invalid quantization spec 'w{bits}a4-"):
            QuantSpec.parse(f"w{bits}a4-{name}")


@pytest.mark.parametrize("bits", [0, 9, True, 2.0])
@pytest.mark.parametrize("name", GRIDS.names())
def test_grid_rejects_impossible_bits(name: str, bits: object) -> None:
    with pytest.raises(InvalidSpecError):
        GRIDS.get(name)(bits)


def test_unknown_grid() -> None:
    with pytest.raises(UnknownNameError, match="quantizer grid 'nope'"):
        GRIDS.get("nope")
    with pytest.raises(InvalidSpecError, match="unknown quantizer grid 'nope'"):
        QuantizerSpec(4, "nope")


@pytest.mark.parametrize("grid", GRID_CASES)
def test_grid_codes_and_range(grid: Grid) -> None:
    assert grid.qmin < grid.qmax and grid.qmax - grid.qmin + 1 <= 2**grid.bits
    low = torch.tensor([-1.0, -0.2, 0.0, -3.0])
    high = torch.tensor([0.5, 2.0, 1.0, 0.0])
    scale, zero_point = grid.qparams(low, high)
    assert scale.shape == zero_point.shape == low.shape and bool((scale > 0).all())
    if not grid.shifted:
        assert torch.equal(zero_point, zero_point.round())
    # the range ends land on the grid or at most one step outside it
    for end in (low, high):
        code = end / scale + zero_point
        assert bool((code >= grid.qmin - 1 - 1e-5).all() and (code <= grid.qmax + 1 + 1e-5).all())


@pytest.mark.parametrize("grid", GRID_CASES)
@pytest.mark.parametrize("learnable", [False, True])
def test_grid_quantizer_levels_and_gradients(grid: Grid, learnable: bool) -> None:
    torch.manual_seed(grid.bits)
    weight = torch.randn(4, 3, 3, 3) * torch.tensor([0.1, 0.5, 1.0, 3.0]).view(4, 1, 1, 1)
    q = FakeQuantizer(grid, channels=4)
    init_weight_quantizer(q, weight)
    q.set_learnable(learnable)
    w = weight.clone().requires_grad_(True)
    out = q(w)
    for c in range(4):
        assert 2 <= len(out[c].unique()) <= grid.qmax - grid.qmin + 1
    # dequantized values are integer codes in [qmin, qmax] times the scale
    shape = (4, 1, 1, 1)
    code = out.detach() / q.scale.detach().view(shape) + q.zero_point.view(shape)
    torch.testing.assert_close(code, code.round(), atol=1e-4, rtol=0)
    assert bool((code.round() >= grid.qmin).all() and (code.round() <= grid.qmax).all())
    (grad,) = torch.autograd.grad(out.square().sum(), w)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if learnable:
        out = q(weight)
        out.sum().backward()
        assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()


# -- calibration methods --------------------------------------------------------------------------


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


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyNet().eval(), torch.rand(96, 1, 8, 8)


def _act_scales(model: nn.Module) -> dict[str, float]:
    return {n: float(m.scale) for n, m in model.named_modules() if n.endswith("act_quant")}


@pytest.mark.parametrize("method", CALIBRATIONS.names())
def test_calibration_method_contract(method: str, tiny: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = tiny
    spec = QuantSpec(4, 4)
    first = calibrate(quantize(model, spec), x, method, "cpu", batch_size=32, seed=3)
    again = calibrate(quantize(model, spec), x, method, "cpu", batch_size=32, seed=3)
    state, state_again = first.state_dict(), again.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)  # deterministic per seed
    scales = [m.scale for m in first.modules() if isinstance(m, FakeQuantizer)]
    assert all(bool(torch.isfinite(s).all() and (s > 0).all()) for s in scales)
    # a method may clip the observed min/max range but never widens it (observed on the
    # network it observes: weights quantized, or float for a float_weights method)
    reference = "float-minmax" if CALIBRATIONS.get(method).float_weights else "minmax"
    minmax = _act_scales(calibrate(quantize(model, spec), x, reference, "cpu", batch_size=32))
    for name, scale in _act_scales(first).items():
        assert scale <= minmax[name] * (1 + 1e-6), name
    # w8a8 calibrated by any method stays close to the float model
    close = calibrate(quantize(model, QuantSpec(8, 8)), x, method, "cpu")
    with torch.no_grad():
        ref = model(x)
        assert float((close(x) - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("method", CALIBRATIONS.names())
def test_every_method_calibrates_every_grid(method: str, tiny) -> None:
    model, x = tiny[0], tiny[1][:32]
    for name in GRIDS.names():
        for bits in (1, 2):
            try:
                spec = QuantSpec(bits, bits, weight_grid=name)
            except InvalidSpecError:
                continue
            q = calibrate(quantize(model, spec, first_last_bits=None), x, method, "cpu")
            set_learnable(q, True)
            q(x).sum().backward()  # LSQ path runs and reaches every scale
            assert all(
                m.scale.grad is not None for m in q.modules() if isinstance(m, FakeQuantizer)
            ), (name, bits)
            set_learnable(q, False)
            with torch.no_grad():
                assert torch.isfinite(q(x)).all(), (name, bits)


def test_calibrate_unknown_method_lists_registry(tiny) -> None:
    model, x = tiny
    with pytest.raises(UnknownNameError) as info:
        calibrate(quantize(model, QuantSpec(8, 8)), x, "kl", "cpu")
    assert ", ".join(CALIBRATIONS.names()) in str(info.value)
