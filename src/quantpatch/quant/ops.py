"""Per-tensor fake quantization with PyTorch's exact arithmetic, in vectorised CPU passes.

PyTorch's CPU per-tensor fake-quant kernels run a scalar loop per element, and their backward
multiplies by a bool mask through a slow type promotion; in an attack's forward + backward
they cost more than the convolutions around them. The functions here compute the same IEEE
float32 operations with torch's vectorised elementwise ops, in place where possible:

* forward (``_fake_quantize_per_tensor_affine_cachemask``): ``round(x * fl(1/s))`` (half to
  even) clamped to ``[qmin - z, qmax - z]`` times ``s``; a NaN maps to ``qmin``. The mask of
  unclamped elements is kept as 0/1 floats, so the backward is one multiply, ``dy * mask``,
  which is what PyTorch's ``dy * bool_mask`` computes.
* LSQ backward (``_fake_quantize_learnable_per_tensor_affine_backward``): as its CPU kernel,
  which the compiler contracts into fused multiply-adds: codes ``round(fma(x, 1/s, z))``;
  per element ``dy * fma(q - z, s, -x) / s * g`` inside the range and ``dy * (q_end - z) * g``
  outside (``g`` the LSQ gradient factor), summed by the same ``sum``. ``torch.addcmul``
  gives the fused multiply-add.

The results equal PyTorch's bit for bit. Because that rests on how this build of PyTorch
compiled its kernels, the first call checks both paths against the native ops on a probe of
ties, clamp boundaries, signed zeros, huge values, infinities and NaNs, and keeps the native
ops if anything differs. They also run for non-CPU devices (their fused kernels are fast
already), other dtypes, inputs that are not dense in the standard or channels-last layout,
tracing, ``torch.compile`` and functorch transforms, and inside ``reference_fake_quant()``:
the computation as it was before this fast path, for checks and before/after benchmarks.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

_LARGEST_CODE = 2.0**60
"""Below this the LSQ kernel's int64 codes equal float ones (past 2**63 the cast wraps)."""

_reference = False
_verified: bool | None = None  # None: not probed yet


@contextlib.contextmanager
def reference_fake_quant() -> Iterator[None]:
    """Run fake quantization on PyTorch's native ops only, with no cached weights: the
    computation as it was before the fast path (for checks and before/after benchmarks)."""
    global _reference
    previous, _reference = _reference, True
    try:
        yield
    finally:
        _reference = previous


def fast_path_active() -> bool:
    """False inside ``reference_fake_quant()`` or while torch traces or compiles the model."""
    if _reference or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return not (active is not None and active())


def _fast_input(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the vectorised path computes exactly what the native op would for ``x``."""
    return (
        type(x) in (torch.Tensor, nn.Parameter)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and scale.dtype == torch.float32
        and x.numel() > 0
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and fast_path_active()
        and _matches_native()
    )


def _value(t: torch.Tensor) -> float:
    return float(t.detach().reshape(-1)[0])


def _inverse(scale_value: float) -> float:
    """``1.0f / s`` as the C++ kernels compute it (float32 division)."""
    return float(np.float32(1.0) / np.float32(scale_value))


# -- frozen qparams ------------------------------------------------------------------------------


def _quantize(
    x: torch.Tensor, scale_value: float, inv: float, low: float, high: float, with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``clamp(round(x * inv), low, high) * s`` (codes shifted by the zero point) and, if
    asked, the 0/1 float mask of the elements the clamp left alone; ``None`` where ``x``
    holds a NaN (the clamp keeps it, the kernel maps it to ``low``). In-place passes over
    at most two new buffers: fresh large buffers cost page faults."""
    codes = torch.mul(x, inv).round_()
    if with_mask:
        out = codes.clamp(low, high)
        mask = torch.eq(codes.sub_(out), 0, out=codes)
    else:
        out, mask = codes.clamp_(low, high), None
    # 0 + s * q: the product, with the -0.0 of round(-0.3) turned into the +0.0 of a zero code
    torch.add(torch.zeros((), dtype=x.dtype), out, alpha=scale_value, out=out)
    if math.isnan(float(out.sum())):
        return None
    return out, mask


def _native_cachemask(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's forward with its mask (as 0/1 floats: ``dy * mask`` is then the same)."""
    enabled = torch.ones(1, dtype=torch.long, device=x.device)
    out, mask = torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
        x, scale, zero_point, enabled, qmin, qmax
    )
    return out, mask.to(x.dtype)


class _PerTensor(torch.autograd.Function):
    """``torch.fake_quantize_per_tensor_affine`` with frozen qparams (evaluation, attacks).

    The backward multiplies the mask in place, into the buffer the forward made for it, so a
    forward + backward allocates two tensors where the native op allocates three and a bool
    mask. A second backward through a retained graph recomputes the mask from the saved
    input (the forward's, version-checked by autograd)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        qmin: int,
        qmax: int,
    ) -> torch.Tensor:
        result = _per_tensor(x, scale, zero_point, qmin, qmax, with_mask=True)
        if result is None:
            result = _native_cachemask(x, scale, zero_point, qmin, qmax)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.mask, ctx.ranges = result[1], (qmin, qmax)  # type: ignore[attr-defined]
        return result[0]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        mask = ctx.mask  # type: ignore[attr-defined]
        if mask is not None and grad.dtype == mask.dtype and grad.stride() == mask.stride():
            ctx.mask = None  # type: ignore[attr-defined]
            return mask.mul_(grad), None, None, None, None  # = grad * mask, elementwise
        x, scale, zero_point = ctx.saved_tensors  # type: ignore[attr-defined]
        result = _per_tensor(x, scale, zero_point, *ctx.ranges, with_mask=True)  # type: ignore[attr-defined]
        if result is None:
            result = _native_cachemask(x, scale, zero_point, *ctx.ranges)  # type: ignore[attr-defined]
        return grad * result[1], None, None, None, None


def _per_tensor(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    with_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    scale_value = _value(scale)
    z = int(_value(zero_point))  # the kernel reads the zero point as an int (truncated)
    inv = _inverse(scale_value)
    return _quantize(x, scale_value, inv, float(qmin - z), float(qmax - z), with_mask)


def fake_quantize_per_tensor(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)`` with
    one-element tensor qparams (no gradient to them), value and input gradient alike."""
    if _fast_input(x, scale):
        if torch.is_grad_enabled() and x.requires_grad:
            return _PerTensor.apply(x, scale, zero_point, qmin, qmax)
        result = _per_tensor(x, scale, zero_point, qmin, qmax, with_mask=False)
        if result is not None:
            return result[0]
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


# -- learnable scale (LSQ) -----------------------------------------------------------------------


def _lsq_zero_points(zero_point: torch.Tensor, qmin: int, qmax: int) -> tuple[int, int]:
    """The integer zero points the LSQ op's forward (rounded) and backward (+0.5,
    truncated) read from the float buffer, both clamped to the code range."""
    zp = np.float32(_value(zero_point))
    forward_z = int(min(max(float(np.rint(zp)), qmin), qmax))
    backward_z = int(min(max(float(zp + np.float32(0.5)), qmin), qmax))
    return forward_z, backward_z


class _LearnablePerTensor(torch.autograd.Function):
    """``torch._fake_quantize_learnable_per_tensor_affine``: LSQ with a scale gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        qmin: int,
        qmax: int,
        grad_factor: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, scale, zero_point)
        ctx.ranges = (qmin, qmax, grad_factor)  # type: ignore[attr-defined]
        return _learnable_forward(x, scale, zero_point, qmin, qmax)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        x, scale, zero_point = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_x, grad_scale = _learnable_backward(grad, x, scale, zero_point, *ctx.ranges)  # type: ignore[attr-defined]
        return grad_x, grad_scale, None, None, None, None


def _learnable_forward(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    scale_value = _value(scale)
    z, _ = _lsq_zero_points(zero_point, qmin, qmax)
    low, high = float(qmin - z), float(qmax - z)
    result = _quantize(x, scale_value, _inverse(scale_value), low, high, with_mask=False)
    if result is not None:
        return result[0]
    return torch.fake_quantize_per_tensor_affine(x, scale_value, z, qmin, qmax)


def _learnable_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and scale gradients of the LSQ op, element for element as its CPU kernel.

    Both cases of the scale gradient are one product ``dy * w * f * g``, with ``w`` =
    ``xfq - x`` or ``q_end - z`` and ``f`` = ``1/s`` or 1, each picked by fused multiply-adds
    with the 0/1 mask (``a + b * 1`` and ``a + b * 0`` are exact; only the sign of a zero
    term can differ, which the sum does not see). In place over three buffers."""
    scale_value = _value(scale)
    inv = _inverse(scale_value)
    _, z = _lsq_zero_points(zero_point, qmin, qmax)
    low, high = (float(v) for v in torch.aminmax(x.detach()))
    if not max(-low, high) * inv < _LARGEST_CODE:  # also NaN and inf: the kernel's int casts
        grad_x, grad_scale, _ = torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
            grad, x, scale, zero_point, qmin, qmax, grad_factor
        )
        return grad_x, grad_scale
    codes = torch.addcmul(x.new_tensor(float(z)), x, x.new_tensor(inv)).round_()
    shifted = codes.clamp(qmin, qmax)
    inside = torch.eq(codes.sub_(shifted), 0, out=codes)
    shifted.sub_(z)  # q - z: the clamped ends are exactly qmin - z and qmax - z
    weight = torch.addcmul(x, shifted, x.new_tensor(scale_value), value=-1)  # -(xfq - x)
    shifted.addcmul_(shifted, inside, value=-1)  # (q - z) outside, 0 inside
    torch.addcmul(shifted, weight, inside, value=-1, out=weight)  # xfq - x inside
    outside = torch.add(x.new_tensor(1.0), inside, alpha=-1, out=shifted)
    factor = torch.addcmul(outside, inside, x.new_tensor(inv), out=outside)  # 1/s or 1
    weight.mul_(grad).mul_(factor).mul_(float(np.float32(grad_factor)))
    grad_x = torch.mul(grad, inside, out=inside)
    return grad_x, weight.sum().reshape(1)


def fake_quantize_learnable_per_tensor(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float,
) -> torch.Tensor:
    """``torch._fake_quantize_learnable_per_tensor_affine`` (LSQ), value and gradients to the
    input and the scale alike (a zero point that requires grad takes the native op)."""
    if _fast_input(x, scale) and not zero_point.requires_grad:
        return _LearnablePerTensor.apply(x, scale, zero_point, qmin, qmax, grad_factor)
    return torch._fake_quantize_learnable_per_tensor_affine(
        x, scale, zero_point, qmin, qmax, grad_factor
    )


# -- the check against this build's native kernels ------------------------------------------------

_PROBE_CASES = ((0, 15, 0.0731, 0), (0, 255, 0.2798, 97), (-7, 7, 0.0123, 0), (0, 1, 1.7, 1))


def _probe_input(scale: float, z: int, qmin: int, qmax: int) -> torch.Tensor:
    """Ties and near-ties of every code and past both ends, clamp ends, signed zeros,
    values the int64 casts cannot hold, infinities and NaN, plus random values."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.arange(qmin - z - 3, qmax - z + 4, dtype=torch.float64)
    ties = ((codes + 0.5) * scale).repeat(16)
    jitter = 1 + (torch.rand(ties.shape, generator=generator, dtype=torch.float64) - 0.5) * 4e-7
    special = [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 3e19, -3e19, math.inf, -math.inf, math.nan]
    return torch.cat([
        ties.float(),
        (ties * jitter).float(),
        (codes * scale).float(),
        torch.tensor(special),
        torch.randn(1024, generator=generator) * scale * (qmax - qmin),
    ])  # fmt: skip


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    )


def _probe() -> bool:
    """Whether the vectorised paths reproduce this build's native kernels bit for bit."""
    for qmin, qmax, s, z in _PROBE_CASES:
        scale, zero_point = torch.tensor([s]), torch.tensor([float(z)])
        x = _probe_input(s, z, qmin, qmax)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        out, mask = _native_cachemask(x, scale, zero_point, qmin, qmax)
        finite = ~torch.isnan(x)
        ours = _per_tensor(x[finite], scale, zero_point, qmin, qmax, with_mask=True)
        if ours is None or not (_same(ours[0], out[finite]) and _same(ours[1], mask[finite])):
            return False
        if _per_tensor(x, scale, zero_point, qmin, qmax, with_mask=True) is not None:
            return False  # a NaN must send the call to the native op
        if qmin <= 0 <= qmax:
            native = torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
                grad[finite], x[finite], scale, zero_point, qmin, qmax, 0.37
            )
            ours_x, ours_scale = _learnable_backward(
                grad[finite], x[finite], scale, zero_point, qmin, qmax, 0.37
            )
            ordinary = x.abs() < 1e6  # the fast arithmetic itself, no fallback
            mine = _learnable_backward(
                grad[ordinary], x[ordinary], scale, zero_point, qmin, qmax, 0.37
            )
            reference = torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
                grad[ordinary], x[ordinary], scale, zero_point, qmin, qmax, 0.37
            )
            if not (
                _same(ours_x, native[0])
                and _same(ours_scale, native[1])
                and _same(mine[0], reference[0])
                and _same(mine[1], reference[1])
            ):
                return False
    return True


def _matches_native() -> bool:
    global _verified
    if _verified is None:
        with torch.no_grad():
            _verified = _probe()
        if not _verified:
            warnings.warn(
                "quantpatch: this PyTorch build's fake-quant kernels round differently from "
                "the vectorised fast path; using the native (slower) ops",
                RuntimeWarning,
                stacklevel=3,
            )
    return _verified
