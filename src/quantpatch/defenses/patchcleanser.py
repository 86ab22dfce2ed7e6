"""PatchCleanser (Xiang et al., USENIX Security 2022): certified robustness to one patch.

Double masking needs forward passes only, so it defends any predictor: fp32 or fake-quant
modules at any bit-width and ONNX Runtime int8 sessions alike. A mask set is R-covering: every
placement of a patch of the stated size lies inside at least one mask, so some mask removes
the whole patch. An image is certified when the model gives its true label with *every* pair
of masks applied (one-mask cases included: a pair of the same mask twice); then the double
masking prediction is that label whatever patch of that size sits anywhere in the image (the
paper's Theorem 1, which holds for any tie-break of the majority vote and any disagreer order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from quantpatch.defenses.base import (
    DEFENSES,
    Certifier,
    Predictor,
    check_float,
    check_images,
    check_int,
    check_labelled,
)
from quantpatch.defenses.certifiable import RandomMasks
from quantpatch.errors import ConfigError, PatchTooLargeError
from quantpatch.models.train import predict_logits

DEFAULT_MASKS_PER_AXIS = 6  # the paper's default (36 first-round masks)
MAX_MASKS_PER_AXIS = 256
"""Beyond any useful count: certification classifies M (M + 1) / 2 two-mask images per image,
M = k² masks (k = 256: over two billion), and per image side ``check_image_size`` refuses
more masks than patch positions."""


@dataclass(frozen=True)
class MaskSet:
    """Rectangular masks of ``size`` (mask height, width) at every ``tops`` x ``lefts`` corner
    (row-major order), covering every placement of a ``patch_hw`` patch in ``image_hw``."""

    image_hw: tuple[int, int]
    patch_hw: tuple[int, int]
    size: tuple[int, int]
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.tops) * len(self.lefts)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) of each mask, row-major."""
        return [(t, x, *self.size) for t in self.tops for x in self.lefts]

    def keep(self) -> torch.Tensor:
        """(M, 1, H, W) bool: ``False`` on the pixels each mask removes."""
        keep = torch.ones(len(self), 1, *self.image_hw, dtype=torch.bool)
        for index, (top, left, height, width) in enumerate(self.boxes()):
            keep[index, :, top : top + height, left : left + width] = False
        return keep


def mask_set(
    image_hw: tuple[int, int],
    patch_size: int,
    masks_per_axis: int | None = None,
    stride: int | None = None,
) -> MaskSet:
    """The paper's mask set per axis: stride ``s`` (given, or ceil((n - p + 1) / k) for k
    masks), mask side ``m = p + s - 1``, corners 0, s, 2s, ... plus ``n - m``: a mask at ``a``
    covers the patch corners ``a .. a + s - 1``, so consecutive corners leave no gap."""
    if (masks_per_axis is None) == (stride is None):
        raise ConfigError("give exactly one of masks_per_axis and stride")
    height, width = (int(n) for n in image_hw)
    size_y, tops = _axis(height, patch_size, masks_per_axis, stride)
    size_x, lefts = _axis(width, patch_size, masks_per_axis, stride)
    return MaskSet((height, width), (patch_size, patch_size), (size_y, size_x), tops, lefts)


def _axis(n: int, p: int, masks: int | None, stride: int | None) -> tuple[int, tuple[int, ...]]:
    if p > n:
        raise PatchTooLargeError(f"a {p}px patch does not fit a {n}px image side")
    s = stride if stride is not None else math.ceil((n - p + 1) / masks)  # type: ignore[operator]
    m = min(p + s - 1, n)
    starts = list(range(0, n - m + 1, s))
    if starts[-1] != n - m:
        starts.append(n - m)
    return m, tuple(starts)


@DEFENSES.register
class PatchCleanser(Certifier):
    """PatchCleanser double masking (Xiang et al. 2022): certified against one patch_size patch.

    ``patch_size``: the side (px) of the patch it certifies against; ``masks_per_axis`` (the
    paper's k, default 6) or ``stride`` sets the mask set; ``mask_value`` fills masked pixels
    (0 = black, MNIST's background); ``batch_size`` masked images per forward pass.
    """

    name = "patchcleanser"

    def __init__(
        self,
        patch_size: int,
        masks_per_axis: int | None = None,
        stride: int | None = None,
        mask_value: float = 0.0,
        batch_size: int = 1024,
    ) -> None:
        self.patch_size = check_int("patchcleanser patch_size", patch_size, minimum=1)
        if masks_per_axis is not None and stride is not None:
            raise ConfigError("patchcleanser takes masks_per_axis or stride, not both")
        if stride is None:
            masks_per_axis = DEFAULT_MASKS_PER_AXIS if masks_per_axis is None else masks_per_axis
            self.masks_per_axis = check_int(
                "patchcleanser masks_per_axis", masks_per_axis, 1, MAX_MASKS_PER_AXIS
            )
            self.stride = None
        else:
            self.masks_per_axis = None
            self.stride = check_int("patchcleanser stride", stride, minimum=1)
        self.mask_value = check_float("patchcleanser mask_value", mask_value, 0.0, 1.0)
        self.batch_size = check_int("patchcleanser batch_size", batch_size, minimum=1)
        self._keeps: dict[tuple, torch.Tensor] = {}

    def mask_set(self, image_hw: tuple[int, int]) -> MaskSet:
        """The masks for images of ``image_hw``, after ``check_image_size``: a study can call
        this before any training to validate the patch size."""
        self.check_image_size(image_hw)
        return mask_set(image_hw, self.patch_size, self.masks_per_axis, self.stride)

    def method(self, image_hw: tuple[int, int]) -> str:
        masks = self.mask_set(image_hw)
        return f"{len(masks)} masks of {masks.size[0]}x{masks.size[1]} px, double masking"

    def check_image_size(self, image_hw: tuple[int, int]) -> None:
        """Refuse a patch larger than ``image_hw`` (``PatchTooLargeError``) and more masks per
        axis, or a larger stride, than the patch has positions along a side (``ConfigError``:
        they would silently give the same masks as that count, or masks wider than the image)."""
        for side in (int(n) for n in image_hw):
            if self.patch_size > side:
                raise PatchTooLargeError(
                    f"a {self.patch_size}px patch does not fit a {side}px image side"
                )
            positions = side - self.patch_size + 1
            if self.masks_per_axis is not None and self.masks_per_axis > positions:
                raise ConfigError(
                    f"patchcleanser masks_per_axis {self.masks_per_axis} is more than the "
                    f"{positions} positions of a {self.patch_size}px patch along a {side}px side"
                )
            if self.stride is not None and self.stride > positions:
                raise ConfigError(
                    f"patchcleanser stride {self.stride} is more than the {positions} positions "
                    f"of a {self.patch_size}px patch along a {side}px side"
                )

    def surrogate(self, model: nn.Module) -> SoftMasking:
        """Every one-mask image's softmax, averaged: a patch that beats double masking must
        fool the one-mask predictions of every mask that leaves it uncovered."""
        return SoftMasking(model, self)

    def train_transform(self, seed: int = 0) -> RandomMasks:
        """Certifiable training input: each image with up to two masks of this mask set."""
        return RandomMasks(self, seed)

    def predict(
        self, model: Predictor, images: torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Double-masking labels (CPU) of possibly attacked ``images``.

        First round: every mask on every image. Second round only for images with a mask
        whose label disagrees with the image's majority, and only the mask pairs that include
        a disagreer, each unordered pair once (pairs are symmetric; a mask paired with itself
        is its first-round label). Each round is one flattened stream in large batches.
        """
        return self._double_masking(model, images, device)[0]

    def scores(
        self,
        model: Predictor,
        images: torch.Tensor,
        num_classes: int,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """(M + 1) for the double-masking label plus, per class, how many of the M one-mask
        images it wins: the argmax is the label, and a patch that fools more one-mask images
        lowers the true class's margin before the label flips."""
        labels, first = self._double_masking(model, images, device)
        masks = first.shape[1] if first.ndim == 2 else 0
        won = torch.zeros(len(labels), num_classes)
        won.scatter_add_(1, first, torch.ones_like(first, dtype=won.dtype))
        return (masks + 1) * torch.nn.functional.one_hot(labels, num_classes).float() + won

    def _double_masking(
        self, model: Predictor, images: torch.Tensor, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, (N, M) first-round one-mask labels), both on the CPU."""
        check_images(images)
        n, masks = len(images), len(self.mask_set(tuple(images.shape[-2:])))
        images = images.detach().to(device)
        everyone, each = torch.arange(n).repeat_interleave(masks), torch.arange(masks).repeat(n)
        first = self._labels(model, images, everyone, each, each, device).view(n, masks)
        disagree = first != majority(first)[:, None]
        a, b = torch.triu_indices(masks, masks, offset=1)
        image_index, pair = (disagree[:, a] | disagree[:, b]).nonzero(as_tuple=True)
        a, b = a[pair], b[pair]
        second = self._labels(model, images, image_index, a, b, device)
        table = first.new_full((n, masks, masks), -1)
        table[image_index, a, b] = second
        table[image_index, b, a] = second
        table.diagonal(dim1=1, dim2=2).copy_(first)
        agree = (table == first[:, :, None]).all(dim=2)
        return double_masking(first, agree & disagree), first

    def certify(
        self,
        model: Predictor,
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(double-masking labels, certified) for clean ``images`` with true ``labels``.

        Evaluates every unordered pair of masks (M (M + 1) / 2 masked images per image);
        the prediction comes from the same table, at no extra cost.
        """
        check_labelled(images, labels)
        n, masks = len(images), len(self.mask_set(tuple(images.shape[-2:])))
        first_mask, second_mask = torch.triu_indices(masks, masks)
        pairs = len(first_mask)
        images = images.detach().to(device)
        rows = torch.arange(n).repeat_interleave(pairs)
        flat = self._labels(model, images, rows, first_mask.repeat(n), second_mask.repeat(n),
                            device)  # fmt: skip
        table_pairs = flat.view(n, pairs)
        table = torch.empty(n, masks, masks, dtype=flat.dtype)
        table[:, first_mask, second_mask] = table_pairs
        table[:, second_mask, first_mask] = table_pairs
        agree = (table == table[:, :, :1]).all(dim=2)
        pred = double_masking(table.diagonal(dim1=1, dim2=2), agree)
        certified = (table_pairs == labels.cpu()[:, None]).all(dim=1)
        return pred, certified

    def _labels(
        self,
        model: Predictor,
        images: torch.Tensor,
        rows: torch.Tensor,
        first_masks: torch.Tensor,
        second_masks: torch.Tensor,
        device: torch.device | str,
    ) -> torch.Tensor:
        """(R,) CPU labels of ``images[rows[r]]`` with masks ``first_masks[r]`` and
        ``second_masks[r]`` applied (the same mask twice: one mask). The masked images are
        built and classified in batches of ``batch_size``, never all at once."""
        keep = self._keep(tuple(images.shape[-2:]), images.device)
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            with torch.inference_mode():
                kept = keep[first_masks[chunk].to(keep.device)]
                kept = kept & keep[second_masks[chunk].to(keep.device)]
                x = torch.where(kept, images[rows[chunk].to(images.device)], self.mask_value)
            out.append(predict_logits(model, x, device, batch_size=len(x)).argmax(dim=1).cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    def _keep(self, image_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
        key = (image_hw, str(device))
        if key not in self._keeps:
            self._keeps[key] = self.mask_set(image_hw).keep().to(device)
        return self._keeps[key]

    def __repr__(self) -> str:
        axis = f"stride={self.stride}" if self.stride else f"masks_per_axis={self.masks_per_axis}"
        return f"PatchCleanser(patch_size={self.patch_size}, {axis}, mask_value={self.mask_value})"


def majority(labels: torch.Tensor) -> torch.Tensor:
    """(N,) the most frequent label of each row of (N, M) labels (ties: the smallest)."""
    if labels.numel() == 0:
        return labels.new_zeros(len(labels))
    counts = labels.new_zeros(len(labels), int(labels.max()) + 1)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    return counts.argmax(dim=1)


def double_masking(first: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of the paper from (N, M) one-mask labels ``first`` and ``agree`` (mask r0's
    second round, r0 plus every mask, gives one label). Case I: no disagreer -> the majority;
    case II: the first disagreer whose second round agrees -> its label; case III: the
    majority."""
    vote = majority(first)
    case_two = (first != vote[:, None]) & agree
    which = case_two.to(torch.uint8).argmax(dim=1)  # the first True (argmax takes the first max)
    disagreer = first.gather(1, which[:, None]).squeeze(1)
    return torch.where(case_two.any(dim=1), disagreer, vote)


class SoftMasking(nn.Module):
    """PatchCleanser made differentiable, to attack it adaptively: ``model`` on every one-mask
    copy of each image (all N x M at once, with gradients), returned as the log of the mean
    softmax over the masks. Ascending its cross-entropy pushes down the true class on the
    masked images the patch survives in, which is what a patch must win to flip double
    masking; masks that cover the patch give it no gradient, as in the defence."""

    def __init__(self, model: nn.Module, cleanser: PatchCleanser) -> None:
        super().__init__()
        self.model = model
        self.cleanser = cleanser

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        keep = self.cleanser.mask_set(tuple(images.shape[-2:])).keep().to(images.device)
        n, masks = len(images), len(keep)
        expanded = images.repeat_interleave(masks, dim=0)
        masked = torch.where(keep.repeat(n, 1, 1, 1), expanded, self.cleanser.mask_value)
        log_probs = self.model(masked).log_softmax(dim=1).view(n, masks, -1)
        return torch.logsumexp(log_probs, dim=1) - math.log(masks)
