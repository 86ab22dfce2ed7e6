"""The in-memory dataset value every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantpatch.errors import ShapeError


@dataclass(frozen=True)
class Split:
    """Images as float32 (N, C, H, W) in [0, 1] and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ShapeError(f"images must be (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ShapeError(
                f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int) -> Split:
        return Split(self.images[:n], self.labels[:n])

    def stratified(self, n: int, seed: int) -> Split:
        """A seeded subset of ``n`` images whose class shares follow the split's (largest
        remainder), in a seeded order; the first ``k`` of ``stratified(n)`` are themselves
        stratified. Use it for evaluation and calibration subsets, never ``head``: files are
        often sorted by class."""
        return Split(
            *(t[stratified_indices(self.labels, n, seed)] for t in (self.images, self.labels))
        )


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a seeded, class-stratified subset of size ``min(n, len(labels))``.

    Each index is keyed by its rank within its class in a seeded shuffle, divided by the
    class size; sorting by that key interleaves the classes in proportion, so every prefix is
    stratified too."""
    if n < 0:
        raise ShapeError(f"subset size must be >= 0, got {n}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    shuffled = labels[order]
    rank = torch.empty(len(labels), dtype=torch.float64)
    for cls in torch.unique(shuffled):
        members = (shuffled == cls).nonzero().squeeze(1)
        rank[members] = (torch.arange(len(members), dtype=torch.float64) + 0.5) / len(members)
    keep = torch.sort(rank, stable=True).indices[:n]
    return order[keep]


@dataclass(frozen=True)
class Dataset:
    """Train/test splits plus what a model needs to know (normalisation lives in the model)."""

    name: str
    train: Split
    test: Split
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)
