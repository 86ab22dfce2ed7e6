"""Accuracy and attack success rate as ``Rate`` values with Wilson intervals."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from quantpatch.errors import ShapeError

Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval; well-behaved at 0 and n, unlike the normal approximation."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds, no rounding dust
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def difference_interval(a: Rate, b: Rate) -> tuple[float, float, float]:
    """(a - b, low, high): Newcombe's hybrid score interval (his method 10) for a difference of
    two rates, built from their Wilson intervals, so it too behaves at 0 and 1. It treats the
    two samples as independent: on the same images (paired) it is conservative."""
    (la, ha), (lb, hb) = a.ci, b.ci
    diff = a.rate - b.rate
    low = diff - math.sqrt((a.rate - la) ** 2 + (hb - b.rate) ** 2)
    high = diff + math.sqrt((ha - a.rate) ** 2 + (b.rate - lb) ** 2)
    return diff, low, high


@dataclass(frozen=True)
class Rate:
    """k successes out of n, with the 95 % Wilson interval."""

    successes: int
    n: int

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.n)

    def to_dict(self) -> dict:
        low, high = self.ci
        return {**asdict(self), "rate": self.rate, "ci_low": low, "ci_high": high}

    def __str__(self) -> str:
        low, high = self.ci
        return f"{100 * self.rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}] (n={self.n})"


def _check(pred: torch.Tensor, labels: torch.Tensor) -> None:
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ShapeError(f"predictions {tuple(pred.shape)} and labels {tuple(labels.shape)} differ")


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> Rate:
    _check(pred, labels)
    return Rate(int((pred == labels).sum()), int(labels.numel()))


def attack_success(
    clean_pred: torch.Tensor,
    adv_pred: torch.Tensor,
    labels: torch.Tensor,
    target: int | None = None,
) -> Rate:
    """ASR over the images the attack can honestly claim (see ``attack_outcomes``)."""
    counted, fooled = attack_outcomes(clean_pred, adv_pred, labels, target)
    return Rate(int(fooled.sum()), int(counted.sum()))


def attack_outcomes(
    clean_pred: torch.Tensor,
    adv_pred: torch.Tensor,
    labels: torch.Tensor,
    target: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(counted, fooled) per image: the images the attack can honestly claim, and those it
    fooled.

    Untargeted: among images the model gets right when clean, the share it gets wrong when
    attacked. Targeted: among images the model gets right when clean and whose true class is
    not the target, the share predicted as the target (an image the model already gets wrong
    is no evidence of a targeted attack's strength).
    """
    _check(clean_pred, labels)
    _check(adv_pred, labels)
    eligible = clean_pred == labels
    if target is None:
        success = eligible & (adv_pred != labels)
    else:
        eligible = eligible & (labels != target)
        success = eligible & (adv_pred == target)
    return eligible, success
