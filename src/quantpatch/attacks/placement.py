"""Batched, differentiable patch placement: the hot path of every patch attack.

Geometry uses continuous pixel coordinates: pixel ``i`` spans ``[i, i + 1)``, so a patch of side
``p`` whose top-left pixel is ``(top, left)`` has its centre at ``(top + p/2, left + p/2)``.
``apply_patch`` pastes a whole batch in one shot. Only a small window around each patch
changes, so all work is O(window): the (patch, mask) canvas is resampled into the window with
one ``grid_sample`` (skipped for unrotated, unscaled patches at integer positions, which makes
that path pixel-identical to slicing), alpha-blended with the gathered window pixels, and
scattered back into a copy of the images. ``paste_at`` is that exact path for integer
positions given directly (e.g. every position of a grid): the one paste kernel of attacks and
analyses, never in place.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from quantpatch.errors import ConfigError, PatchTooLargeError, ShapeError

Location = Literal["random", "center"] | tuple[int, int]
MaskShape = Literal["square", "circle"]
MASK_SHAPES: tuple[str, ...] = ("square", "circle")


@dataclass(frozen=True)
class EOT:
    """Expectation-over-transformation ranges: how patch placements are drawn.

    ``scale_*`` multiply the nominal patch side (1.0 = ``patch_size`` px); rotations are drawn
    uniformly from ``[-rotation_max_deg, rotation_max_deg]``; ``location`` is ``"random"``
    (anywhere fully inside the image), ``"center"`` or a fixed ``(top, left)`` in pixels.
    """

    rotation_max_deg: float = 22.5
    scale_min: float = 1.0
    scale_max: float = 1.0
    location: Location = "random"

    def __post_init__(self) -> None:
        for name in ("rotation_max_deg", "scale_min", "scale_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"eot {name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.rotation_max_deg <= 180.0:
            raise ConfigError(f"rotation_max_deg must be in [0, 180], got {self.rotation_max_deg}")
        if not 0.0 < self.scale_min <= self.scale_max:
            raise ConfigError(
                f"need 0 < scale_min <= scale_max, got {self.scale_min} and {self.scale_max}"
            )
        object.__setattr__(self, "location", _check_location(self.location))

    @property
    def transforms(self) -> bool:
        """Whether any rotation or scaling is drawn (if not, placements can be pixel-exact)."""
        return self.rotation_max_deg > 0 or self.scale_min != 1.0 or self.scale_max != 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(self.location, tuple):
            data["location"] = list(self.location)
        return data

    @classmethod
    def coerce(cls, value: EOT | Mapping[str, Any] | None, default: EOT | None = None) -> EOT:
        """Accept an ``EOT``, ``None`` (``default``, else ``EOT()``) or a dict (from YAML) whose
        entries override ``default``."""
        base = default if default is not None else cls()
        if value is None:
            return base
        if isinstance(value, EOT):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(
                set(value) - {"rotation_max_deg", "scale_min", "scale_max", "location"}
            )
            if unknown:
                raise ConfigError(f"unknown eot setting(s): {', '.join(unknown)}")
            return replace(base, **value)
        raise ConfigError(f"eot must be an EOT or a mapping, got {type(value).__name__}")


def _check_location(location: Any) -> Location:
    if location in ("random", "center"):
        return location
    if isinstance(location, (tuple, list)) and len(location) == 2:
        try:
            top, left = (int(v) for v in location)
        except (TypeError, ValueError):
            top = left = -1
        if top >= 0 and left >= 0 and [top, left] == [float(v) for v in location]:
            return (top, left)
    raise ConfigError(f"location must be 'random', 'center' or (top, left) >= 0, got {location!r}")


@dataclass(frozen=True)
class Placement:
    """Per-image patch poses: centre ``cy``/``cx`` (pixels), ``angle`` (radians), ``scale``.

    All four are 1-D float tensors of the batch length. Attacks keep them on the CPU (cheap to
    sample and slice); ``apply_patch`` moves what it needs to the images' device.
    """

    cy: torch.Tensor
    cx: torch.Tensor
    angle: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        n = self.cy.shape
        for name in ("cy", "cx", "angle", "scale"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.shape != n:
                raise ShapeError(f"Placement.{name} must be a 1-D tensor of length {tuple(n)}")

    def __len__(self) -> int:
        return int(self.cy.shape[0])

    def __getitem__(self, index: slice | torch.Tensor) -> Placement:
        return Placement(self.cy[index], self.cx[index], self.angle[index], self.scale[index])

    def to(self, device: torch.device | str) -> Placement:
        return Placement(*(t.to(device) for t in (self.cy, self.cx, self.angle, self.scale)))

    @classmethod
    def at(cls, tops: torch.Tensor, lefts: torch.Tensor, patch_size: int) -> Placement:
        """Unrotated, unscaled patches with their top-left pixels at ``(tops[i], lefts[i])``."""
        half = patch_size / 2
        cy, cx = tops.float() + half, lefts.float() + half
        return cls(cy, cx, torch.zeros_like(cy), torch.ones_like(cy))

    @classmethod
    def fixed(cls, batch: int, top: int, left: int, patch_size: int) -> Placement:
        """Every image gets the unrotated, unscaled patch with its top-left pixel at (top, left)."""
        if batch < 0 or patch_size < 1:
            raise ShapeError(f"need batch >= 0 and patch_size >= 1, got {batch}, {patch_size}")
        half = patch_size / 2
        full = torch.full((batch,), 0.0)
        return cls(full + (top + half), full + (left + half), full.clone(), full + 1.0)

    def top_left(self, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-left corner of the (unrotated) scaled patch box, in pixels."""
        half = self.scale * (patch_size / 2)
        return self.cy - half, self.cx - half

    def is_exact(self, patch_size: int) -> bool:
        """No rotation, unit scale and integer corners: the paste can be pixel-exact."""
        if len(self) == 0:
            return True
        if bool((self.angle != 0).any()) or bool((self.scale != 1).any()):
            return False
        top, left = self.top_left(patch_size)
        return bool((top == top.round()).all()) and bool((left == left.round()).all())

    def theta(self, image_hw: tuple[int, int], patch_size: int) -> torch.Tensor:
        """(N, 2, 3) ``affine_grid`` matrices mapping image coordinates into patch coordinates.

        Both grids use ``align_corners=False`` normalised coordinates. For an image point ``u``
        (pixels), the patch point is ``R(-angle) (u - c) / (scale * p/2)`` in [-1, 1] units.
        """
        height, width = image_hw
        k = 2.0 / (patch_size * self.scale)
        cos, sin = torch.cos(self.angle) * k, torch.sin(self.angle) * k
        dx, dy = width / 2 - self.cx, height / 2 - self.cy
        row0 = torch.stack([cos * (width / 2), sin * (height / 2), cos * dx + sin * dy], dim=1)
        row1 = torch.stack([-sin * (width / 2), cos * (height / 2), cos * dy - sin * dx], dim=1)
        return torch.stack([row0, row1], dim=1)


def max_footprint(patch_size: int, eot: EOT) -> float:
    """Side (px) of the largest axis-aligned box any placement drawn from ``eot`` can cover."""
    angle = math.radians(min(eot.rotation_max_deg, 45.0))
    return patch_size * eot.scale_max * (math.cos(angle) + math.sin(angle))


def sample_placement(
    batch: int,
    image_hw: tuple[int, int],
    patch_size: int,
    eot: EOT,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Placement:
    """Draw ``batch`` placements from ``eot`` with ``generator`` (a CPU generator).

    Random locations keep the rotated, scaled patch fully inside the image; without rotation or
    scaling they land on integer pixels, so ``apply_patch`` takes its exact path. Image ``i``'s
    placement depends only on the generator state, not on ``batch`` (rows are drawn in order).
    """
    height, width = (int(v) for v in image_hw)
    _check_fits(patch_size, height, width)
    footprint = max_footprint(patch_size, eot) if eot.location == "random" else patch_size
    if footprint > min(height, width) + 1e-6:
        raise PatchTooLargeError(
            f"a {patch_size}px patch (scale up to {eot.scale_max}, rotation up to "
            f"{eot.rotation_max_deg} deg) covers up to {footprint:.1f}px, more than the "
            f"{height}x{width} image"
        )
    u = torch.rand(batch, 4, generator=generator, dtype=torch.float64)
    max_rad = math.radians(eot.rotation_max_deg)
    angle = (2 * u[:, 0] - 1) * max_rad if max_rad > 0 else torch.zeros(batch, dtype=u.dtype)
    scale = eot.scale_min + u[:, 1] * (eot.scale_max - eot.scale_min)
    if eot.location == "random":
        if eot.transforms:
            half = scale * (patch_size / 2) * (angle.cos().abs() + angle.sin().abs())
            cy = half + u[:, 2] * (height - 2 * half)
            cx = half + u[:, 3] * (width - 2 * half)
        else:  # integer corners -> pixel-exact paste
            cy = (u[:, 2] * (height - patch_size + 1)).floor() + patch_size / 2
            cx = (u[:, 3] * (width - patch_size + 1)).floor() + patch_size / 2
    else:
        top, left = _fixed_corner(eot.location, patch_size, height, width)
        cy = torch.full((batch,), top + patch_size / 2, dtype=u.dtype)
        cx = torch.full((batch,), left + patch_size / 2, dtype=u.dtype)
    placement = Placement(*(t.float() for t in (cy, cx, angle, scale)))
    return placement.to(device) if device is not None else placement


def grid_corners(
    image_hw: tuple[int, int], patch_size: int, per_side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_side**2`` integer top-left corners (rows, then columns): the centres of equal cells
    of the range of corners that keep the patch inside, so they spread evenly over the image
    (``per_side=1`` is the centre)."""
    height, width = (int(v) for v in image_hw)
    _check_fits(patch_size, height, width)
    cells = (torch.arange(per_side, dtype=torch.float64) + 0.5) / per_side
    rows = (cells * (height - patch_size)).round().long()
    cols = (cells * (width - patch_size)).round().long()
    return rows.repeat_interleave(per_side), cols.repeat(per_side)


def _fixed_corner(location: Location, patch_size: int, height: int, width: int) -> tuple[int, int]:
    if location == "center":  # integer corner, so the centred patch is still pixel-exact
        return (height - patch_size) // 2, (width - patch_size) // 2
    top, left = location  # type: ignore[misc]
    if top + patch_size > height or left + patch_size > width:
        raise PatchTooLargeError(
            f"a {patch_size}px patch at (top={top}, left={left}) leaves the {height}x{width} image"
        )
    return top, left


def patch_mask(patch_size: int, shape: MaskShape = "square") -> torch.Tensor:
    """(1, p, p) float mask: all ones, or the pixels whose centres lie in the inscribed circle."""
    if patch_size < 1:
        raise ShapeError(f"patch_size must be >= 1, got {patch_size}")
    if shape == "square":
        return torch.ones(1, patch_size, patch_size)
    if shape == "circle":
        r = torch.arange(patch_size, dtype=torch.float32) + 0.5 - patch_size / 2
        inside = r[:, None] ** 2 + r[None, :] ** 2 <= (patch_size / 2) ** 2
        return inside.float().unsqueeze(0)
    raise ConfigError(f"unknown patch shape '{shape}'; choose from: {', '.join(MASK_SHAPES)}")


def apply_patch(
    images: torch.Tensor,
    patch: torch.Tensor,
    placement: Placement,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paste ``patch`` into every image at its placement; differentiable w.r.t. ``patch``.

    ``images`` (N, C, H, W); ``patch`` (C, p, p) shared by all images or (N, C, p, p) one per
    image; ``mask`` (1, p, p) or (N, 1, p, p) in [0, 1] (``None`` = square). Returns
    ``images * (1 - m) + patch * m`` with ``m`` the pasted mask.
    """
    p = check_patch(images, patch)
    n, _, height, width = images.shape
    if len(placement) != n:
        raise ShapeError(f"placement has {len(placement)} entries for {n} images")
    patch = patch.to(device=images.device, dtype=images.dtype)  # differentiable
    plan = prepare_paste(placement, (height, width), p, images.device)
    return plan(images, make_canvas(patch, mask))


def paste_at(
    images: torch.Tensor,
    patch: torch.Tensor,
    tops: torch.Tensor,
    lefts: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paste ``patch`` into image k with its top-left pixel at ``(tops[k], lefts[k])``.

    The exact path of ``apply_patch`` for integer positions, also for rectangular patches:
    ``patch`` (C, ph, pw) shared or (N, C, ph, pw) per image; ``mask`` (1 or C, ph, pw) blends
    ``images * (1 - mask) + patch * mask``. Returns a new tensor (``images`` is never written,
    so it may be a view of a dataset) and is differentiable w.r.t. ``patch``.
    """
    if images.ndim != 4:
        raise ShapeError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    n, channels, height, width = images.shape
    if patch.ndim not in (3, 4) or patch.shape[-3] != channels:
        raise ShapeError(f"patch must be ({channels}, ph, pw) or (N, {channels}, ph, pw), got "
                         f"{tuple(patch.shape)}")  # fmt: skip
    if patch.ndim == 4 and patch.shape[0] != n:
        raise ShapeError(f"{patch.shape[0]} per-image patches for {n} images")
    p_h, p_w = (int(v) for v in patch.shape[-2:])
    if p_h > height or p_w > width:
        raise PatchTooLargeError(f"a {p_h}x{p_w} patch does not fit a {height}x{width} image")
    tops, lefts = tops.to(images.device), lefts.to(images.device)
    if tops.shape != (n,) or lefts.shape != (n,):
        raise ShapeError(f"need {n} tops and lefts, got {tuple(tops.shape)}, {tuple(lefts.shape)}")
    if n and not bool(
        (tops.min() >= 0) & (lefts.min() >= 0) & (tops.max() <= height - p_h)
        & (lefts.max() <= width - p_w)
    ):  # fmt: skip
        raise PatchTooLargeError(f"a {p_h}x{p_w} patch leaves the {height}x{width} image")
    plan = PastePlan(tops.long() * width + lefts.long(), (p_h, p_w), (height, width), None)
    return plan(images, make_canvas(patch.to(device=images.device, dtype=images.dtype), mask))


@dataclass(frozen=True)
class PastePlan:
    """Everything a batch of pastes needs except the pixels, precomputed once.

    Each image only changes inside a ``window`` (Sy, Sx) box whose top-left pixel sits at flat
    index ``offset = top * W + left`` and that holds the whole transformed patch, so sampling,
    blending and the backward pass cost O(window) rather than O(image). ``theta`` maps window
    coordinates into patch coordinates; ``None`` means the window *is* the patch (the exact,
    integer-position path). Plans slice like the batch (``plan[i:j]``, ``plan[index]``), so a
    loop can precompute all its steps at once.
    """

    offset: torch.Tensor
    window: tuple[int, int]
    image_hw: tuple[int, int]
    theta: torch.Tensor | None

    @property
    def exact(self) -> bool:
        return self.theta is None

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def __getitem__(self, index: slice | torch.Tensor) -> PastePlan:
        theta = None if self.theta is None else self.theta[index]
        return PastePlan(self.offset[index], self.window, self.image_hw, theta)

    def to(self, device: torch.device | str) -> PastePlan:
        theta = None if self.theta is None else self.theta.to(device, non_blocking=True)
        offset = self.offset.to(device, non_blocking=True)
        return PastePlan(offset, self.window, self.image_hw, theta)

    def __call__(self, images: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        """Blend ``canvas`` (1 or N, C + k, ph, pw), from ``make_canvas``, into ``images``."""
        n = images.shape[0]
        if tuple(images.shape[-2:]) != self.image_hw or n != len(self):
            raise ShapeError(
                f"plan for {len(self)} images of {self.image_hw}, got {tuple(images.shape)}"
            )
        canvas = canvas.expand(n, -1, -1, -1)
        if self.theta is None:
            window = canvas
        else:
            theta = self.theta.to(device=images.device, dtype=images.dtype)
            grid = _affine_grid(theta, *self.window)
            window = F.grid_sample(canvas, grid, "bilinear", "zeros", align_corners=False)
        return _blend_window(images, window, self.offset)


def prepare_paste(
    placement: Placement,
    image_hw: tuple[int, int],
    patch_size: int,
    device: torch.device | str | None = None,
) -> PastePlan:
    """Plan the pastes of ``placement`` (built on the CPU, then moved to ``device``).

    Unrotated, unscaled placements at integer positions fully inside the image get the exact
    path; everything else is resampled bilinearly inside a window just big enough for the
    largest transformed patch of the batch (plus the half-pixel bilinear fringe).
    """
    height, width = (int(v) for v in image_hw)
    p = patch_size
    placement = placement.to("cpu")
    if placement.is_exact(p):
        top, left = (t.round().long() for t in placement.top_left(p))
        inside = (top >= 0) & (left >= 0) & (top + p <= height) & (left + p <= width)
        if bool(inside.all()):
            plan = PastePlan(top * width + left, (p, p), (height, width), None)
            return plan.to(device) if device is not None else plan
    turn = placement.angle.cos().abs() + placement.angle.sin().abs()
    half = (p + 1) * placement.scale / 2 * turn
    side = math.ceil(2 * float(half.max())) + 2 if len(placement) else p
    sy, sx = min(side, height), min(side, width)
    oy = (placement.cy - sy / 2).floor().clamp(0, height - sy)
    ox = (placement.cx - sx / 2).floor().clamp(0, width - sx)
    local = Placement(placement.cy - oy, placement.cx - ox, placement.angle, placement.scale)
    offset = oy.long() * width + ox.long()
    plan = PastePlan(offset, (sy, sx), (height, width), local.theta((sy, sx), p))
    return plan.to(device) if device is not None else plan


@functools.lru_cache(maxsize=32)
def _base_grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(3, H * W) rows x, y, 1 of ``align_corners=False`` normalised pixel-centre coordinates."""
    ys = (torch.arange(height, dtype=torch.float64) * 2 + 1) / height - 1
    xs = (torch.arange(width, dtype=torch.float64) * 2 + 1) / width - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.ones(height * width, dtype=ys.dtype)])
    return base.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _ones(p_h: int, p_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached (1, 1, ph, pw) full mask, so the hot loop allocates nothing for it."""
    return torch.ones(1, 1, p_h, p_w, device=device, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _window_index(sy: int, sx: int, width: int, device: torch.device) -> torch.Tensor:
    """(Sy * Sx,) flat image indices of a window whose top-left pixel is pixel 0."""
    rows = torch.arange(sy, device=device)[:, None] * width
    return (rows + torch.arange(sx, device=device)).reshape(-1)


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, *, H, W), align_corners=False)`` as one (2N, 3) x (3, HW)
    matmul: much faster than its batched bmm of 3-wide matrices on the CPU."""
    n = theta.shape[0]
    base = _base_grid(height, width, theta.device, theta.dtype)
    grid = theta.reshape(n * 2, 3).mm(base)  # (2N, HW)
    return grid.view(n, 2, height, width).permute(0, 2, 3, 1)


def _blend_window(images: torch.Tensor, window: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``images * (1 - m) + patch * m`` inside each image's window, via one gather and one
    out-of-place scatter; ``window = [patch * m, m]`` (premultiplied; m has 1 or C channels)."""
    n, c, height, width = images.shape
    sy, sx = window.shape[-2:]
    base = _window_index(sy, sx, width, images.device)
    offset = offset.to(images.device, non_blocking=True)
    index = (offset[:, None] + base).view(n, 1, sy * sx).expand(n, c, sy * sx)
    flat = images.reshape(n, c, height * width)
    region = flat.gather(2, index)
    premultiplied, alpha = window.split([c, window.shape[1] - c], dim=1)
    # the mask is never learned: no gradient through it saves several backward kernels
    keep = 1 - alpha.detach().reshape(n, -1, sy * sx)
    blended = torch.addcmul(premultiplied.reshape(n, c, sy * sx), region, keep)
    return flat.scatter(2, index, blended).view(n, c, height, width)


def check_patch(images: torch.Tensor, patch: torch.Tensor) -> int:
    """Validate shapes; return the patch side."""
    if images.ndim != 4:
        raise ShapeError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if patch.ndim not in (3, 4) or patch.shape[-1] != patch.shape[-2]:
        raise ShapeError(f"patch must be (C, p, p) or (N, C, p, p), got {tuple(patch.shape)}")
    if patch.shape[-3] != images.shape[1]:
        raise ShapeError(f"patch has {patch.shape[-3]} channels, images have {images.shape[1]}")
    if patch.ndim == 4 and patch.shape[0] != images.shape[0]:
        raise ShapeError(f"{patch.shape[0]} per-image patches for {images.shape[0]} images")
    p = int(patch.shape[-1])
    _check_fits(p, int(images.shape[2]), int(images.shape[3]))
    return p


def _check_fits(patch_size: int, height: int, width: int) -> None:
    if patch_size < 1:
        raise ShapeError(f"patch_size must be >= 1, got {patch_size}")
    if patch_size > height or patch_size > width:
        raise PatchTooLargeError(f"a {patch_size}px patch does not fit a {height}x{width} image")


def make_canvas(patch: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(1 or N, C + k, ph, pw): the mask-premultiplied patch with the mask (k = 1 channel, or
    C for a per-channel mask) as extra channels.

    The mask is treated as a constant: ``apply_patch`` passes no gradient to it."""
    batched = patch if patch.ndim == 4 else patch.unsqueeze(0)
    n, c, p_h, p_w = batched.shape
    if mask is None:
        alpha = _ones(p_h, p_w, batched.device, batched.dtype).expand(n, 1, p_h, p_w)
        return torch.cat([batched, alpha], dim=1)
    if mask.ndim == 3:
        mask = mask.unsqueeze(0)
    if mask.ndim != 4 or mask.shape[1] not in (1, c) or mask.shape[-2:] != (p_h, p_w):
        raise ShapeError(
            f"mask must be (1 or {c}, {p_h}, {p_w}), optionally per image, got {tuple(mask.shape)}"
        )
    mask = mask.to(device=batched.device, dtype=batched.dtype)
    premultiplied = batched * mask
    return torch.cat([premultiplied, mask.expand(premultiplied.shape[0], -1, -1, -1)], dim=1)
