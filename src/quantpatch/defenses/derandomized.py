"""(De)randomized smoothing (Levine & Feizi, NeurIPS 2020): certified robustness to one patch.

The base classifier sees one ablation of the image at a time: a band of ``b`` columns (column
ablation) or a ``b`` x ``b`` block (block ablation) kept, everything else removed, at every
start position, wrapping around the edges, in the paper's encoding (``encode_ablation``:
2C channels). Each ablation votes for every class whose softmax reaches the threshold ``θ``
(several classes when ``θ`` <= 0.5, none when no class does), and the smoothed classifier
predicts the class with the most votes (ties: the smaller class index).

A patch of side ``p`` overlaps at most ``Δ = p + b - 1`` column ablations (block ablation:
``(p + b - 1)²``), and only those can change their votes, each by at most one per class. So
when the predicted class's count exceeds every other class's by more than ``2Δ`` (or by
exactly ``2Δ`` against a larger class index, which loses the tie), no patch of side ``p``
anywhere can change the prediction. The vote needs forward passes only, so it certifies any
predictor taking the 2C encoding: fp32 or fake-quant modules and ONNX Runtime sessions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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
from quantpatch.defenses.certifiable import RandomAblation, encode_ablation
from quantpatch.errors import ConfigError, PatchTooLargeError, ShapeError
from quantpatch.models.train import predict_logits

ABLATIONS = ("column", "block")


@dataclass(frozen=True)
class AblationSet:
    """Every ablation of ``kind`` ("column" or "block") with band ``band`` on ``image_hw``
    images: the band (block) starting at each column (each pixel), wrapping around."""

    kind: str
    band: int
    image_hw: tuple[int, int]

    def __len__(self) -> int:
        height, width = self.image_hw
        return width if self.kind == "column" else height * width

    def kept_rows(self) -> torch.Tensor:
        """(A, H) bool: the rows each ablation keeps (column ablation: all of them)."""
        height, width = self.image_hw
        if self.kind == "column":
            return torch.ones(width, height, dtype=torch.bool)
        tops = torch.arange(height).repeat_interleave(width)
        return _band(tops, self.band, height)

    def kept_columns(self) -> torch.Tensor:
        """(A, W) bool: the columns each ablation keeps."""
        height, width = self.image_hw
        lefts = torch.arange(width) if self.kind == "column" else torch.arange(width).repeat(height)
        return _band(lefts, self.band, width)

    def keep(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """(len(index), 1, H, W) bool: ``True`` on the pixels ablations ``index`` keep (all
        ablations when ``index`` is None)."""
        rows, columns = self.kept_rows(), self.kept_columns()
        if index is not None:
            rows, columns = rows[index], columns[index]
        return (rows[:, :, None] & columns[:, None, :])[:, None]

    def affected(self, patch_size: int) -> int:
        """Δ: the most ablations a ``patch_size`` px patch can overlap (on each axis, the
        ``p + b - 1`` band starts that reach it, at most the side)."""
        height, width = self.image_hw
        reach = patch_size + self.band - 1
        columns = min(reach, width)
        return columns if self.kind == "column" else columns * min(reach, height)


def _band(starts: torch.Tensor, band: int, side: int) -> torch.Tensor:
    """(len(starts), side) bool: positions ``start .. start + band - 1`` modulo ``side``."""
    return (torch.arange(side)[None, :] - starts[:, None]) % side < band


def certify_counts(counts: torch.Tensor, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, certified) from (N, K) vote counts and Δ, the paper's rule: the prediction
    is the most voted class (ties: the smallest index); it is certified when its count beats
    every smaller class index by more than ``2Δ`` and every larger one by at least ``2Δ``
    (a patch can take Δ votes from it and give Δ to another; a tie goes to the smaller index).
    """
    if counts.ndim != 2 or counts.shape[1] < 2:
        raise ShapeError(f"counts must be (N, K) with K >= 2, got {tuple(counts.shape)}")
    prediction = counts.argmax(dim=1)  # documented: the first maximal index
    top = counts.gather(1, prediction[:, None])
    smaller = torch.arange(counts.shape[1])[None, :] < prediction[:, None]
    enough = top - counts >= 2 * delta + smaller.long()
    enough[torch.arange(len(counts)), prediction] = True
    return prediction, enough.all(dim=1)


@dataclass(frozen=True)
class Ceiling:
    """At most ``most`` of ``n`` images can any base model certify; ``proven``: the solver
    reached the optimum (else ``most`` is its bound when time ran out, still an upper bound)."""

    most: int
    n: int
    proven: bool


def _ceiling_program(
    inked: np.ndarray, labels: np.ndarray, classes: int, delta: int, time_limit: float
) -> Ceiling:
    """max sum_n z_n over binary s[j, c] (blank ablation j votes for class c) and z_n (image n
    certified): for each image and class c != y, its inked ablations plus the blank ones
    voting y, less those voting c, reach 2Δ (2Δ + 1 against a smaller c), when z_n = 1."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # only here: slow to import
    from scipy.sparse import coo_matrix

    images, positions = inked.shape
    votes = positions * classes
    per_image = classes - 1
    others = np.arange(per_image)[None, :]
    rivals = others + (others >= labels[:, None])  # (N, K - 1): every class but the label
    need = 2 * delta + (rivals < labels[:, None])  # +1 against a smaller class: the tie-break
    # row n * (K - 1) + r for image n and its rival r: each blank position j of n adds
    # s[j, y_n] - s[j, rival], and z_n comes in with -(need + blanks)
    image, position = np.nonzero(~inked)
    image, position = image.repeat(per_image), position.repeat(per_image)
    rival = np.tile(np.arange(per_image), len(image) // per_image)
    row = image * per_image + rival
    rows = np.concatenate([row, row, np.arange(images * per_image)])
    columns = np.concatenate([position * classes + labels[image],
                              position * classes + rivals[image, rival],
                              votes + np.arange(images).repeat(per_image)])  # fmt: skip
    blanks = (~inked).sum(axis=1, keepdims=True)
    values = np.concatenate([np.ones(len(row)), -np.ones(len(row)), -(need + blanks).ravel()])
    matrix = coo_matrix((values, (rows, columns)), shape=(images * per_image, votes + images))
    lower = np.full(images * per_image, -positions)  # inked + blank ablations: all of them
    objective = np.concatenate([np.zeros(votes), -np.ones(images)])
    result = milp(objective, constraints=LinearConstraint(matrix.tocsr(), lower, np.inf),
                  integrality=np.ones(votes + images), bounds=Bounds(0, 1),
                  options={"time_limit": time_limit})  # fmt: skip
    bound = getattr(result, "mip_dual_bound", None)
    if bound is None or not np.isfinite(bound):
        return Ceiling(images, images, proven=False)  # no bound in time: every image, trivially
    most = min(images, int(np.floor(-bound + 1e-6)))
    return Ceiling(most, images, proven=result.status == 0)


@DEFENSES.register
class DerandomizedSmoothing(Certifier):
    """(De)randomized smoothing (Levine & Feizi 2020): certified against one patch_size patch.

    ``ablation``: "column" (bands of ``band`` columns, one per column: W votes) or "block"
    (``band`` x ``band`` blocks, one per pixel: H x W votes); ``threshold`` θ in (0, 1]: an
    ablation votes for each class whose softmax reaches it (the paper's MNIST setting: b = 4,
    θ = 0.2); ``batch_size`` ablated images per forward pass. The base model takes the
    2C-channel encoding (see ``create_ablation_model`` and ``train_transform``).
    """

    name = "derandomized-smoothing"

    def __init__(
        self,
        patch_size: int,
        ablation: str = "column",
        band: int = 4,
        threshold: float = 0.2,
        batch_size: int = 1024,
    ) -> None:
        self.patch_size = check_int("derandomized-smoothing patch_size", patch_size, minimum=1)
        if ablation not in ABLATIONS:
            raise ConfigError(
                f"derandomized-smoothing ablation must be one of {', '.join(ABLATIONS)}, "
                f"got {ablation!r}"
            )
        self.ablation = ablation
        self.band = check_int("derandomized-smoothing band", band, minimum=1)
        self.threshold = check_float(
            "derandomized-smoothing threshold", threshold, 0.0, 1.0, open_min=True
        )
        self.batch_size = check_int("derandomized-smoothing batch_size", batch_size, minimum=1)
        self._masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- geometry and validation --------------------------------------------------------------
    def method(self, image_hw: tuple[int, int]) -> str:
        votes = self.ablation_set(image_hw)
        return (f"{self.ablation} ablation, band {self.band}, θ {self.threshold:g}, "
                f"{len(votes)} votes")  # fmt: skip

    def ablation_set(self, image_hw: tuple[int, int]) -> AblationSet:
        """The ablations for ``image_hw`` images, after ``check_image_size``."""
        self.check_image_size(image_hw)
        return AblationSet(self.ablation, self.band, (int(image_hw[0]), int(image_hw[1])))

    def check_image_size(self, image_hw: tuple[int, int]) -> None:
        """Refuse, before any work, a band wider than the image (``ConfigError``), a patch
        larger than it (``PatchTooLargeError``) or a patch no vote can certify against: one
        whose ``2Δ`` margin is at least the number of votes (``ConfigError``)."""
        self.check_patch_size(self.patch_size, image_hw)

    def check_patch_size(self, patch_size: int, image_hw: tuple[int, int]) -> None:
        """``check_image_size`` for a patch of side ``patch_size`` (a point of the curve)."""
        height, width = (int(n) for n in image_hw)
        side = width if self.ablation == "column" else min(height, width)
        if self.band > side:
            raise ConfigError(
                f"derandomized-smoothing band {self.band} is wider than the {side}px image side"
            )
        if patch_size > min(height, width):
            raise PatchTooLargeError(f"a {patch_size}px patch does not fit {height}x{width} images")
        ablations = AblationSet(self.ablation, self.band, (height, width))
        delta, votes = ablations.affected(patch_size), len(ablations)
        if 2 * delta >= votes:
            raise ConfigError(
                f"derandomized-smoothing cannot certify a {patch_size}px patch with "
                f"{self.ablation} band {self.band} on {height}x{width} images: it meets up to "
                f"{delta} of the {votes} ablations, and the margin 2x{delta} needs more votes; "
                f"use a narrower band or a smaller patch"
            )

    def delta(self, image_hw: tuple[int, int]) -> int:
        """Δ: the most ablations one patch of ``patch_size`` can change on ``image_hw``."""
        return self.ablation_set(image_hw).affected(self.patch_size)

    @staticmethod
    def base_in_channels(in_channels: int) -> int:
        """Input channels of the base model for images of ``in_channels`` (the encoding)."""
        return 2 * in_channels

    def ceiling(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        time_limit: float = 60.0,
    ) -> Ceiling:
        """The most of ``images`` any base model could certify against ``patch_size``: the
        share no training can pass. An ablation that keeps only zero pixels shows every image
        the same input at its position, so its votes go to one fixed set of classes there,
        whatever the image; every other ablation at best votes for the true class alone. The
        best choice of those fixed sets is a small integer program (HiGHS, through SciPy);
        past ``time_limit`` seconds the solver's bound is returned, still an upper bound (up
        to the solver's floating-point tolerances). Any fixed set is allowed, whatever θ.
        """
        check_labelled(images, labels)
        if num_classes < 2:
            raise ShapeError(f"a vote needs >= 2 classes, got {num_classes}")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise ShapeError(f"labels must lie in [0, {num_classes}) for {num_classes} classes")
        if not len(images):
            return Ceiling(0, 0, proven=True)
        ablations = self.ablation_set(tuple(images.shape[-2:]))
        ink = (images.detach().cpu() != 0).any(dim=1).flatten(1).float()  # (N, H*W)
        inked = (ink @ ablations.keep()[:, 0].flatten(1).float().T > 0).numpy()  # (N, A)
        return _ceiling_program(inked, labels.cpu().numpy(), num_classes,
                                ablations.affected(self.patch_size), time_limit)  # fmt: skip

    # -- the vote -----------------------------------------------------------------------------
    def votes(
        self, model: Predictor, images: torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """(N, K) int64 CPU vote counts of ``model`` over every ablation of ``images``.

        All (image, ablation) pairs form one flattened stream, encoded and classified
        ``batch_size`` at a time (a chunk holds whole images' ablations or straddles them),
        with no per-image loop.
        """
        check_images(images)
        image_hw = tuple(images.shape[-2:])
        count = len(self.ablation_set(image_hw))
        images = images.detach().to(device)
        rows, columns = self._kept(image_hw, images.device)
        total, counts = len(images) * count, None
        for start in range(0, total, self.batch_size):
            flat = torch.arange(start, min(start + self.batch_size, total), device=images.device)
            image_index, ablation = flat // count, flat % count
            with torch.inference_mode():
                keep = (rows[ablation][:, :, None] & columns[ablation][:, None, :])[:, None]
                x = encode_ablation(images[image_index], keep)
            logits = predict_logits(model, x, device, batch_size=len(x))
            ballots = (logits.softmax(dim=1) >= self.threshold).long()
            if counts is None:
                counts = torch.zeros(len(images), ballots.shape[1], dtype=torch.long)
            counts.index_add_(0, image_index.cpu(), ballots)
        return counts if counts is not None else torch.zeros(0, 0, dtype=torch.long)

    def predict(
        self, model: Predictor, images: torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Smoothed labels (CPU) of possibly attacked ``images``: the most voted class."""
        counts = self.votes(model, images, device)
        if not len(counts):
            return torch.empty(0, dtype=torch.long)
        return counts.argmax(dim=1)

    def scores(
        self,
        model: Predictor,
        images: torch.Tensor,
        num_classes: int,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """The vote counts, less a thousandth of a vote per class index (the tie-break to the
        smaller index, kept by ``argmax``): a query attack sees each vote it takes."""
        counts = self.votes(model, images, device).float()
        if not len(counts):
            return torch.zeros(0, num_classes)
        return counts - 1e-3 * torch.arange(counts.shape[1], dtype=counts.dtype)

    def certify(
        self,
        model: Predictor,
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(smoothed labels, certified) for clean ``images`` with true ``labels``: certified
        means the label is right and no ``patch_size`` patch anywhere can change it."""
        prediction, certified = self.certify_sizes(model, images, labels, [self.patch_size],
                                                   device)  # fmt: skip
        return prediction, certified[self.patch_size]

    def certify_sizes(
        self,
        model: Predictor,
        images: torch.Tensor,
        labels: torch.Tensor,
        sizes: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(smoothed labels, {side: certified}) against a patch of each side in ``sizes``,
        from one vote: the votes do not depend on the patch, only the margin ``2Δ`` does."""
        check_labelled(images, labels)
        image_hw = tuple(images.shape[-2:])
        for size in sizes:
            self.check_patch_size(size, image_hw)
        counts = self.votes(model, images, device)
        if not len(counts):
            empty = torch.empty(0, dtype=torch.bool)
            return torch.empty(0, dtype=torch.long), {size: empty for size in sizes}
        ablations = self.ablation_set(image_hw)
        prediction, certified = counts.argmax(dim=1), {}  # certify_counts' prediction rule
        for size in sizes:
            _, robust = certify_counts(counts, ablations.affected(size))
            certified[size] = robust & (prediction == labels.cpu())
        return prediction, certified

    def _kept(self, image_hw: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (image_hw, str(device))
        if key not in self._masks:
            ablations = self.ablation_set(image_hw)
            self._masks[key] = (ablations.kept_rows().to(device),
                                ablations.kept_columns().to(device))  # fmt: skip
        return self._masks[key]

    # -- training and attacks -----------------------------------------------------------------
    def train_transform(self, seed: int = 0) -> RandomAblation:
        """Certifiable training input: one random ablation per image, encoded (2C channels)."""
        return RandomAblation(self, seed)

    def soft_vote(self, model: nn.Module, temperature: float = 0.05) -> SoftVote:
        """A differentiable surrogate of this vote around ``model``, for attacks."""
        return SoftVote(model, self, temperature)

    def surrogate(self, model: nn.Module) -> SoftVote:
        """The soft vote: adaptive attacks on the smoothed classifier go through it."""
        return self.soft_vote(model)

    def __repr__(self) -> str:
        return (
            f"DerandomizedSmoothing(patch_size={self.patch_size}, ablation={self.ablation!r}, "
            f"band={self.band}, threshold={self.threshold})"
        )


class SoftVote(nn.Module):
    """The smoothed classifier made differentiable, to attack it empirically: every ablation's
    hard ballot ``softmax >= θ`` becomes ``sigmoid((softmax - θ) / temperature)`` and the
    (N, K) soft counts summed over ablations are returned as logits (their argmax tracks the
    vote as the temperature goes to 0). All N x A ablated images go through ``model`` at once
    with gradients, so keep attack batches small for block ablation (A = H x W).
    """

    def __init__(
        self, model: nn.Module, smoothing: DerandomizedSmoothing, temperature: float = 0.05
    ) -> None:
        super().__init__()
        self.model = model
        self.smoothing = smoothing
        self.temperature = check_float("soft vote temperature", temperature, 0.0, open_min=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        keep = self.smoothing.ablation_set(tuple(images.shape[-2:])).keep().to(images.device)
        n, count = len(images), len(keep)
        expanded = images.repeat_interleave(count, dim=0)
        encoded = encode_ablation(expanded, keep.repeat(n, 1, 1, 1))
        probabilities = self.model(encoded).softmax(dim=1).view(n, count, -1)
        ballots = torch.sigmoid((probabilities - self.smoothing.threshold) / self.temperature)
        return ballots.sum(dim=1)
