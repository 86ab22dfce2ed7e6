"""Rates over trained models x images: hierarchical bootstrap, paired comparisons, masking check.

A study's rate depends on two draws: which models training produced (one per replicate seed)
and which evaluation images were drawn. A Wilson interval covers only the images. Here the
replicates (models) are resampled with replacement first, then the images within each drawn
replicate, so the interval also shows how much the finding moves when the model is retrained.

Images are resampled exactly, without an image axis: drawing ``n`` of a replicate's ``n`` binary
outcomes with replacement gives ``Binomial(n, k / n)`` successes, and drawing ``n`` pairs of
outcomes on the same images gives ``Multinomial(n, shares of the four (a, b) pairs)``. A
bootstrap draw therefore costs one random number per drawn replicate, whatever ``n`` is.

Inputs per replicate are either per-image outcomes (a 1-D boolean tensor or array, one entry
per eligible image) or a ``Rate`` (successes of n). Paired comparisons pair replicate ``k`` of
``a`` with replicate ``k`` of ``b``; outcomes also pair image ``i`` with image ``i`` (the caller
aligns them on the same images), two ``Rate`` s resample their images independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from quantpatch.errors import ConfigError, ShapeError
from quantpatch.metrics.rates import Rate, wilson_interval

Outcomes = torch.Tensor | np.ndarray | Sequence[bool]
"""One replicate's per-image outcomes: 1-D, boolean (or 0/1), one entry per image."""

N_BOOT = 2000
LEVEL = 0.95
_TAILS = ((1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2)


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicateRate:
    """A rate over ``replicates`` trained models: each model's rate, their (unweighted) mean,
    and the 95 % hierarchical-bootstrap interval (never narrower than the pooled images'
    Wilson interval, which the bootstrap undercuts at rates of 0 or 1 where every draw is
    equal). With one replicate the interval covers the images only."""

    per_replicate: tuple[Rate, ...]
    mean: float
    ci: tuple[float, float]
    n_boot: int
    seed: int

    @property
    def replicates(self) -> int:
        return len(self.per_replicate)

    @property
    def model_variance_measured(self) -> bool:
        return self.replicates > 1

    @property
    def rates(self) -> tuple[float, ...]:
        return tuple(r.rate for r in self.per_replicate)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.ci
        return {
            "replicates": self.replicates,
            "per_replicate": [r.to_dict() for r in self.per_replicate],
            "mean": self.mean,
            "ci_low": low,
            "ci_high": high,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "model_variance_measured": self.model_variance_measured,
        }

    def __str__(self) -> str:
        low, high = self.ci
        each = ", ".join(f"{100 * r:.1f}" for r in self.rates)
        return (
            f"{100 * self.mean:.1f}% [{100 * low:.1f}, {100 * high:.1f}] "
            f"({self.replicates} replicate{'s' if self.replicates > 1 else ''}: {each}; "
            f"n={_n_range(self.per_replicate)})"
        )


@dataclass(frozen=True)
class PairedDifference:
    """``a - b``: the mean over replicates of each replicate's difference, with its 95 %
    interval from a bootstrap that draws the same replicates (and, for per-image outcomes,
    the same images) for both. ``excludes_zero``: the interval lies wholly on one side of 0.

    A percentile bootstrap cannot reach beyond the spread its few models showed, so with
    3-5 replicates that disagree it claims a difference more often than 5 % of the time.
    ``t_ci`` is the Student-t interval over the per-replicate differences (each already holds
    its images' noise; None for one replicate): it keeps its level at any number of
    replicates, at the price of width when there are few."""

    difference: float
    ci: tuple[float, float]
    t_ci: tuple[float, float] | None
    rate_a: float
    rate_b: float
    per_replicate: tuple[float, ...]
    images_paired: bool
    n_boot: int
    seed: int

    @property
    def replicates(self) -> int:
        return len(self.per_replicate)

    @property
    def model_variance_measured(self) -> bool:
        return self.replicates > 1

    @property
    def excludes_zero(self) -> bool:
        return _excludes_zero(self.ci)

    @property
    def t_excludes_zero(self) -> bool:
        return self.t_ci is not None and _excludes_zero(self.t_ci)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.ci
        t_low, t_high = self.t_ci if self.t_ci is not None else (None, None)
        return {
            "difference": self.difference,
            "ci_low": low,
            "ci_high": high,
            "excludes_zero": self.excludes_zero,
            "t_ci_low": t_low,
            "t_ci_high": t_high,
            "t_excludes_zero": self.t_excludes_zero,
            "rate_a": self.rate_a,
            "rate_b": self.rate_b,
            "per_replicate": list(self.per_replicate),
            "replicates": self.replicates,
            "images_paired": self.images_paired,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "model_variance_measured": self.model_variance_measured,
        }

    def __str__(self) -> str:
        low, high = self.ci
        return (
            f"{100 * self.difference:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}] "
            f"over {self.replicates} replicate{'s' if self.replicates > 1 else ''}"
        )


@dataclass(frozen=True)
class RateRatio:
    """``mean rate_a / mean rate_b`` with its 95 % paired-bootstrap interval ("% of white-box",
    "x plain QAT"). ``ratio`` is None when ``rate_b`` is 0; bootstrap draws whose ``b`` is 0
    count as +inf (``a`` > 0, so ``ci_high`` may be inf) or are left out (``a`` = 0 too:
    ``undefined_draws`` of ``n_boot``)."""

    ratio: float | None
    ci: tuple[float, float] | None
    rate_a: float
    rate_b: float
    replicates: int
    images_paired: bool
    undefined_draws: int
    n_boot: int
    seed: int

    @property
    def model_variance_measured(self) -> bool:
        return self.replicates > 1

    def to_dict(self) -> dict[str, Any]:
        low, high = self.ci if self.ci is not None else (None, None)
        return {
            "ratio": self.ratio,
            "ci_low": low,
            "ci_high": high,
            "rate_a": self.rate_a,
            "rate_b": self.rate_b,
            "replicates": self.replicates,
            "images_paired": self.images_paired,
            "undefined_draws": self.undefined_draws,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "model_variance_measured": self.model_variance_measured,
        }

    def __str__(self) -> str:
        if self.ratio is None or self.ci is None:
            return "undefined (the reference rate is 0)"
        low, high = self.ci
        return f"{self.ratio:.2f}x [{low:.2f}, {high:.2f}]"


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test of two outcome vectors on the same images: under no difference,
    each of the ``a_only + b_only`` discordant images is ``a``'s with probability 1/2.
    ``p_greater``: one-sided, against "a succeeds more often than b"; ``p_less`` the reverse."""

    both: int
    a_only: int
    b_only: int
    neither: int
    p_two_sided: float
    p_greater: float
    p_less: float

    @property
    def n(self) -> int:
        return self.both + self.a_only + self.b_only + self.neither

    def to_dict(self) -> dict[str, Any]:
        return {
            "both": self.both,
            "a_only": self.a_only,
            "b_only": self.b_only,
            "neither": self.neither,
            "n": self.n,
            "p_two_sided": self.p_two_sided,
            "p_greater": self.p_greater,
            "p_less": self.p_less,
        }


@dataclass(frozen=True)
class MaskingCheck:
    """Does a query-only attack succeed more often than the white-box one on the same images?
    (It should not: a gradient-free attack beating the gradient attack means the gradients
    mislead, i.e. masking.) ``flagged`` when the one-sided exact McNemar test rejects at
    ``alpha`` (p <= alpha). ``min_detectable_excess``: the smallest excess of the query-only rate over the
    white-box rate this test detects with probability ``power`` at this n (see
    ``min_detectable_excess``); None when no excess that fits the white-box failures would be.
    Replicates are pooled into one test (valid: pairs stay within their image and model)."""

    query_rate: float
    white_box_rate: float
    test: McNemarResult
    alpha: float
    power: float
    min_detectable_excess: float | None

    @property
    def n(self) -> int:
        return self.test.n

    @property
    def p_value(self) -> float:
        return self.test.p_greater

    @property
    def flagged(self) -> bool:
        return self.p_value <= self.alpha

    def statement(self) -> str:
        """One sentence for the report: the verdict and what a "no flag" can rule out."""
        head = (
            f"query-only {100 * self.query_rate:.1f}% vs white-box "
            f"{100 * self.white_box_rate:.1f}% (n={self.n}, one-sided p={self.p_value:.3g})"
        )
        if self.flagged:
            return f"masking flagged: {head}"
        if self.min_detectable_excess is None:
            return f"no flag, but at n={self.n} no excess could be detected: {head}"
        return (
            f"no flag: {head}; this test detects a query-only excess of "
            f">= {100 * self.min_detectable_excess:.1f} points with {100 * self.power:.0f}% "
            f"power at alpha={self.alpha:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "query_rate": self.query_rate,
            "white_box_rate": self.white_box_rate,
            "n": self.n,
            "query_only": self.test.a_only,
            "white_box_only": self.test.b_only,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "flagged": self.flagged,
            "power": self.power,
            "min_detectable_excess": self.min_detectable_excess,
            "statement": self.statement(),
        }


# -- public functions -----------------------------------------------------------------------------


def hierarchical_bootstrap(
    per_replicate: Sequence[Outcomes | Rate], n_boot: int = N_BOOT, seed: int = 0
) -> ReplicateRate:
    """Per-replicate rates, their mean and a 95 % percentile interval that resamples
    replicates with replacement, then images within each drawn replicate (seeded)."""
    _check_n_boot(n_boot)
    rates = tuple(_as_rate(x, k) for k, x in enumerate(_non_empty(per_replicate)))
    successes = np.array([r.successes for r in rates])
    n = np.array([r.n for r in rates])
    rng = np.random.default_rng(seed)
    drawn = _draw_replicates(rng, len(rates), n_boot)
    draws = (rng.binomial(n[drawn], successes[drawn] / n[drawn]) / n[drawn]).mean(axis=1)
    boot_low, boot_high = _percentiles(draws)
    wilson_low, wilson_high = wilson_interval(int(successes.sum()), int(n.sum()))
    ci = (min(boot_low, wilson_low), max(boot_high, wilson_high))
    return ReplicateRate(rates, float((successes / n).mean()), ci, n_boot, seed)


def paired_difference(
    a: Sequence[Outcomes | Rate],
    b: Sequence[Outcomes | Rate],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> PairedDifference:
    """``rate_a - rate_b`` on the same replicates (and images), with a paired 95 % interval."""
    _check_n_boot(n_boot)
    pairs = _pairs(a, b)
    rng = np.random.default_rng(seed)
    draw_a, draw_b = pairs.draw(rng, n_boot)
    boot = (draw_a - draw_b).mean(axis=1)
    each = pairs.rate_a - pairs.rate_b
    return PairedDifference(
        difference=float(each.mean()),
        ci=_percentiles(boot),
        t_ci=_t_interval(each),
        rate_a=float(pairs.rate_a.mean()),
        rate_b=float(pairs.rate_b.mean()),
        per_replicate=tuple(float(d) for d in each),
        images_paired=pairs.images_paired,
        n_boot=n_boot,
        seed=seed,
    )


def rate_ratio(
    a: Sequence[Outcomes | Rate],
    b: Sequence[Outcomes | Rate],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> RateRatio:
    """``mean rate_a / mean rate_b`` on the same replicates (and images), with a paired 95 %
    interval; a ratio of means over replicates, which stays finite when one replicate's
    ``b`` is 0."""
    _check_n_boot(n_boot)
    pairs = _pairs(a, b)
    rng = np.random.default_rng(seed)
    draw_a, draw_b = pairs.draw(rng, n_boot)
    mean_a, mean_b = draw_a.mean(axis=1), draw_b.mean(axis=1)
    defined = (mean_b > 0) | (mean_a > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = np.where(mean_b > 0, mean_a / np.where(mean_b > 0, mean_b, 1.0), np.inf)[defined]
    rate_a, rate_b = float(pairs.rate_a.mean()), float(pairs.rate_b.mean())
    ratio = rate_a / rate_b if rate_b > 0 else None
    ci = _percentiles(boot) if ratio is not None and len(boot) else None
    return RateRatio(
        ratio=ratio,
        ci=ci,
        rate_a=rate_a,
        rate_b=rate_b,
        replicates=pairs.replicates,
        images_paired=pairs.images_paired,
        undefined_draws=int((~defined).sum()),
        n_boot=n_boot,
        seed=seed,
    )


def mcnemar_exact(a: Outcomes, b: Outcomes) -> McNemarResult:
    """Exact (binomial) McNemar test of outcomes ``a`` and ``b`` on the same images."""
    x, y = _as_outcomes(a, "a"), _as_outcomes(b, "b")
    if x.shape != y.shape:
        raise ShapeError(f"paired outcomes must cover the same images: {len(x)} vs {len(y)}")
    from scipy.stats import binom  # deferred: scipy.stats takes most of a second to import

    a_only, b_only = int((x & ~y).sum()), int((~x & y).sum())
    discordant = a_only + b_only
    p_greater = float(binom.sf(a_only - 1, discordant, 0.5))  # P(X >= a_only)
    p_less = float(binom.cdf(a_only, discordant, 0.5))  # P(X <= a_only)
    return McNemarResult(
        both=int((x & y).sum()),
        a_only=a_only,
        b_only=b_only,
        neither=int((~x & ~y).sum()),
        p_two_sided=min(1.0, 2 * min(p_greater, p_less)),
        p_greater=p_greater,
        p_less=p_less,
    )


def masking_check(
    query: Sequence[Outcomes],
    white_box: Sequence[Outcomes],
    alpha: float = 0.05,
    power: float = 0.8,
) -> MaskingCheck:
    """One-sided paired test of "the query-only attack succeeds more often than the white-box
    attack" on the same images of each replicate (pooled), with the test's power at this n."""
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ConfigError(f"alpha and power must lie in (0, 1), got {alpha} and {power}")
    _non_empty(query)
    if len(query) != len(white_box):
        raise ShapeError(f"{len(query)} query replicates vs {len(white_box)} white-box replicates")
    q = np.concatenate([_as_outcomes(x, f"query[{k}]") for k, x in enumerate(query)])
    w = np.concatenate([_as_outcomes(x, f"white_box[{k}]") for k, x in enumerate(white_box)])
    test = mcnemar_exact(q, w)
    if test.n == 0:
        raise ShapeError("masking check needs at least one image")
    return MaskingCheck(
        query_rate=float(q.mean()),
        white_box_rate=float(w.mean()),
        test=test,
        alpha=alpha,
        power=power,
        min_detectable_excess=min_detectable_excess(
            test.n, test.b_only / test.n, float(w.mean()), alpha, power
        ),
    )


def min_detectable_excess(
    n: int, white_box_only: float, white_box_rate: float, alpha: float = 0.05, power: float = 0.8
) -> float | None:
    """The smallest ``query rate - white-box rate`` the one-sided exact McNemar test at level
    ``alpha`` detects with probability ``power`` over ``n`` pairs.

    Method: exact power, no normal approximation. Pairs are i.i.d. with a share ``q`` of
    query-only successes and the observed share ``white_box_only`` of white-box-only ones
    (and the white-box rate held at its observed value, so ``q <= 1 - white_box_rate``).
    The discordant count is ``D ~ Binomial(n, q + white_box_only)``; given ``D = d`` the test
    rejects when the query-only count reaches the smallest ``k_d`` with
    ``P(Binomial(d, 1/2) >= k_d) <= alpha``, which happens with probability
    ``P(Binomial(d, q / (q + white_box_only)) >= k_d)``. Power is the sum over ``d``; ``q`` is
    found by bisection (power grows with ``q``). The excess is ``q - white_box_only``. None when
    even ``q = 1 - white_box_rate`` falls short of ``power``.
    """
    if n < 1:
        raise ShapeError(f"power needs at least one pair, got n={n}")
    from scipy.stats import binom  # deferred, as in mcnemar_exact

    d = np.arange(n + 1)
    k = binom.ppf(1 - alpha, d, 0.5) + 1  # smallest k with P(X <= k - 1) >= 1 - alpha
    k = np.where(binom.sf(k - 2, d, 0.5) <= alpha, k - 1, k)  # float rounding at the edge
    k = np.where(binom.sf(k - 1, d, 0.5) > alpha, k + 1, k)

    def power_at(q: float) -> float:
        discordant = q + white_box_only
        if discordant <= 0:
            return 0.0
        share = q / discordant
        return float((binom.pmf(d, n, discordant) * binom.sf(k - 1, d, share)).sum())

    high = 1.0 - white_box_rate
    if high <= 0 or power_at(high) < power:
        return None
    low = 0.0
    for _ in range(60):  # bisection to ~1e-18: far below any rate that matters
        mid = (low + high) / 2
        low, high = (mid, high) if power_at(mid) < power else (low, mid)
    return high - white_box_only


# -- the paired draw ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pairs:
    """Per-replicate counts of two outcomes. Image-paired: ``counts`` (R, 4) holds the number
    of images with (a, b) = (1, 1), (1, 0), (0, 1), (0, 0). Unpaired images: ``counts`` (R, 2)
    holds the successes of a and b, ``n`` (R, 2) their image counts."""

    counts: np.ndarray
    n: np.ndarray
    images_paired: bool

    @property
    def replicates(self) -> int:
        return len(self.counts)

    @property
    def rate_a(self) -> np.ndarray:
        if self.images_paired:
            return (self.counts[:, 0] + self.counts[:, 1]) / self.n
        return self.counts[:, 0] / self.n[:, 0]

    @property
    def rate_b(self) -> np.ndarray:
        if self.images_paired:
            return (self.counts[:, 0] + self.counts[:, 2]) / self.n
        return self.counts[:, 1] / self.n[:, 1]

    def draw(self, rng: np.random.Generator, n_boot: int) -> tuple[np.ndarray, np.ndarray]:
        """(rate_a, rate_b) of ``n_boot`` bootstrap draws x R drawn replicates."""
        drawn = _draw_replicates(rng, self.replicates, n_boot)
        if self.images_paired:
            n = self.n[drawn]
            cells = rng.multinomial(n, (self.counts / self.n[:, None])[drawn])
            return (cells[..., 0] + cells[..., 1]) / n, (cells[..., 0] + cells[..., 2]) / n
        n_a, n_b = self.n[drawn, 0], self.n[drawn, 1]
        draw_a = rng.binomial(n_a, self.counts[drawn, 0] / n_a) / n_a
        draw_b = rng.binomial(n_b, self.counts[drawn, 1] / n_b) / n_b
        return draw_a, draw_b


def _pairs(a: Sequence[Outcomes | Rate], b: Sequence[Outcomes | Rate]) -> _Pairs:
    _non_empty(a)
    if len(a) != len(b):
        raise ShapeError(f"paired comparison needs as many replicates: {len(a)} vs {len(b)}")
    kinds = {isinstance(x, Rate) for x in (*a, *b)}
    if kinds == {False}:
        counts = [_pair_counts(x, y, k) for k, (x, y) in enumerate(zip(a, b, strict=True))]
        table = np.array(counts)
        return _Pairs(table, table.sum(axis=1), images_paired=True)
    if kinds == {True}:
        rates = [
            (_as_rate(x, k), _as_rate(y, k)) for k, (x, y) in enumerate(zip(a, b, strict=True))
        ]
        counts = np.array([(x.successes, y.successes) for x, y in rates])
        return _Pairs(counts, np.array([(x.n, y.n) for x, y in rates]), images_paired=False)
    raise ShapeError("pass per-image outcomes for every replicate of a and b, or Rates for all")


def _pair_counts(a: Outcomes, b: Outcomes, k: int) -> tuple[int, int, int, int]:
    x, y = _as_outcomes(a, f"a[{k}]"), _as_outcomes(b, f"b[{k}]")
    if x.shape != y.shape:
        raise ShapeError(
            f"replicate {k}: paired outcomes must cover the same images, {len(x)} vs {len(y)}"
        )
    if not len(x):
        raise ShapeError(f"replicate {k} has no images")
    return int((x & y).sum()), int((x & ~y).sum()), int((~x & y).sum()), int((~x & ~y).sum())


# -- helpers --------------------------------------------------------------------------------------


def _draw_replicates(rng: np.random.Generator, replicates: int, n_boot: int) -> np.ndarray:
    """(n_boot, R) replicate indices drawn with replacement (all 0 for one replicate)."""
    return rng.integers(0, replicates, size=(n_boot, replicates))


def _percentiles(draws: np.ndarray) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles as order statistics (``inverted_cdf``), so an infinite
    draw stays at its end instead of turning the interpolation into NaN."""
    low, high = np.quantile(draws, _TAILS, method="inverted_cdf")
    return float(low), float(high)


def _t_interval(values: np.ndarray) -> tuple[float, float] | None:
    """95 % Student-t interval for the mean of ``values`` (None for fewer than two)."""
    if len(values) < 2:
        return None
    from scipy.stats import t  # deferred, as in mcnemar_exact

    half = float(t.ppf(_TAILS[1], len(values) - 1)) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def _excludes_zero(ci: tuple[float, float]) -> bool:
    return ci[0] > 0 or ci[1] < 0


def _as_outcomes(x: Outcomes, name: str) -> np.ndarray:
    """A 1-D boolean numpy copy of ``x``; 0/1 integers are accepted, anything else refused."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim != 1:
        raise ShapeError(f"{name}: outcomes must be 1-D (one per image), got {array.shape}")
    if array.dtype != np.bool_:
        if array.size and not np.isin(array, (0, 1)).all():
            raise ShapeError(f"{name}: outcomes must be boolean (0 or 1 per image)")
        array = array.astype(bool)
    return array


def _as_rate(x: Outcomes | Rate, k: int) -> Rate:
    rate = x if isinstance(x, Rate) else _rate_of(_as_outcomes(x, f"replicate {k}"))
    if rate.n <= 0:
        raise ShapeError(f"replicate {k} has no images")
    if not 0 <= rate.successes <= rate.n:
        raise ShapeError(f"replicate {k}: {rate.successes} successes of {rate.n}")
    return rate


def _rate_of(outcomes: np.ndarray) -> Rate:
    return Rate(int(outcomes.sum()), int(outcomes.size))


def _non_empty(per_replicate: Sequence[Any]) -> Sequence[Any]:
    if isinstance(per_replicate, torch.Tensor | np.ndarray) or not len(per_replicate):
        raise ShapeError("pass a list with one entry (outcomes or Rate) per replicate")
    return per_replicate


def _check_n_boot(n_boot: int) -> None:
    if n_boot < 100:
        raise ConfigError(f"n_boot must be >= 100 for a 95 % percentile interval, got {n_boot}")


def _n_range(rates: Sequence[Rate]) -> str:
    low, high = min(r.n for r in rates), max(r.n for r in rates)
    return str(low) if low == high else f"{low}-{high}"


__all__ = [
    "N_BOOT",
    "MaskingCheck",
    "McNemarResult",
    "Outcomes",
    "PairedDifference",
    "RateRatio",
    "ReplicateRate",
    "hierarchical_bootstrap",
    "masking_check",
    "mcnemar_exact",
    "min_detectable_excess",
    "paired_difference",
    "rate_ratio",
]
