"""Statistics over trained models x images: hierarchical bootstrap, paired tests, masking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import binom

from quantpatch.errors import ConfigError, ShapeError
from quantpatch.metrics import (
    Rate,
    hierarchical_bootstrap,
    masking_check,
    mcnemar_exact,
    min_detectable_excess,
    paired_difference,
    rate_ratio,
    wilson_interval,
)


def _width(ci: tuple[float, float]) -> float:
    return ci[1] - ci[0]


def _outcomes(counts: tuple[int, int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled image-paired outcomes with (both, a only, b only, neither) = ``counts``."""
    both, a_only, b_only, neither = counts
    a = np.array([1] * both + [1] * a_only + [0] * b_only + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * a_only + [1] * b_only + [0] * neither, dtype=bool)
    order = np.random.default_rng(seed).permutation(len(a))
    return a[order], b[order]


# -- hierarchical bootstrap -----------------------------------------------------------------------


def test_interval_widens_when_replicates_disagree() -> None:
    """Same mean, same n, same pooled images: only the spread between models differs."""
    agree = hierarchical_bootstrap([Rate(150, 500)] * 5, seed=1)
    disagree = hierarchical_bootstrap([Rate(k, 500) for k in (50, 100, 150, 200, 250)], seed=1)
    assert agree.mean == pytest.approx(0.3) and disagree.mean == pytest.approx(0.3)
    assert agree.ci[0] < 0.3 < agree.ci[1] and disagree.ci[0] < 0.3 < disagree.ci[1]
    assert _width(disagree.ci) > 3 * _width(agree.ci)
    # agreeing models add nothing to the images' own uncertainty
    assert _width(agree.ci) < 1.3 * _width(wilson_interval(750, 2500))
    assert agree.model_variance_measured and agree.replicates == 5


def test_one_replicate_gives_the_images_only_interval_and_says_so() -> None:
    result = hierarchical_bootstrap([torch.arange(400) % 4 == 0], seed=0)  # 100 of 400
    low, high = wilson_interval(100, 400)
    assert not result.model_variance_measured
    assert result.per_replicate == (Rate(100, 400),) and result.mean == 0.25
    assert result.ci[0] <= low and result.ci[1] >= high
    assert _width(result.ci) < 1.2 * (high - low)
    assert not result.to_dict()["model_variance_measured"]


def test_rates_at_the_edge_keep_an_interval() -> None:
    """All replicates at 0 successes: every bootstrap draw is 0, the Wilson floor is not."""
    result = hierarchical_bootstrap([Rate(0, 300)] * 3)
    assert result.ci[0] == 0.0 and result.ci[1] == pytest.approx(wilson_interval(0, 900)[1])


def test_outcomes_and_rates_give_the_same_result() -> None:
    rng = np.random.default_rng(3)
    vectors = [rng.random(n) < p for n, p in ((300, 0.2), (280, 0.35), (310, 0.5))]
    rates = [Rate(int(v.sum()), len(v)) for v in vectors]
    assert hierarchical_bootstrap(vectors, seed=5) == hierarchical_bootstrap(rates, seed=5)


def test_binomial_draw_matches_explicit_image_resampling() -> None:
    """The exact shortcut (Binomial successes per drawn replicate) against the textbook
    bootstrap that draws replicate indices, then image indices, and averages."""
    rng = np.random.default_rng(0)
    vectors = [rng.random(n) < p for n, p in ((120, 0.1), (100, 0.3), (140, 0.45))]
    explicit = np.empty(4000)
    for b in range(len(explicit)):
        drawn = rng.integers(0, 3, size=3)
        explicit[b] = np.mean([vectors[k][rng.integers(0, len(vectors[k]), len(vectors[k]))].mean()
                               for k in drawn])  # fmt: skip
    reference = np.quantile(explicit, [0.025, 0.975])
    result = hierarchical_bootstrap(vectors, n_boot=4000, seed=1)
    assert result.ci == pytest.approx(tuple(reference), abs=0.015)


def test_interval_covers_the_mean_of_a_simulated_hierarchical_model() -> None:
    """Models whose true rates spread (sd 0.08 around 0.3), 100 images each: the pooled
    Wilson interval ignores the spread and misses the mean often; the hierarchical one
    comes close to its nominal 95 % with 10 replicates."""
    rng = np.random.default_rng(0)
    mean, sims, replicates, n = 0.3, 120, 10, 100
    shape = mean * (1 - mean) / 0.08**2 - 1
    covered = covered_wilson = 0
    for s in range(sims):
        true = rng.beta(mean * shape, (1 - mean) * shape, replicates)
        rates = [Rate(int(rng.binomial(n, p)), n) for p in true]
        low, high = hierarchical_bootstrap(rates, n_boot=500, seed=s).ci
        covered += low <= mean <= high
        w_low, w_high = wilson_interval(sum(r.successes for r in rates), n * replicates)
        covered_wilson += w_low <= mean <= w_high
    assert covered / sims >= 0.85
    assert covered_wilson / sims <= 0.75


def test_seed_makes_the_bootstrap_deterministic() -> None:
    rates = [Rate(k, 200) for k in (40, 60, 90)]
    assert hierarchical_bootstrap(rates, seed=7) == hierarchical_bootstrap(rates, seed=7)
    assert hierarchical_bootstrap(rates, seed=7).ci != hierarchical_bootstrap(rates, seed=8).ci
    a, b = _outcomes((30, 40, 10, 120), seed=0), _outcomes((20, 50, 15, 115), seed=1)
    first = paired_difference([a[0], b[0]], [a[1], b[1]], seed=3)
    assert first == paired_difference([a[0], b[0]], [a[1], b[1]], seed=3)
    assert rate_ratio([a[0]], [a[1]], seed=3) == rate_ratio([a[0]], [a[1]], seed=3)


# -- paired comparisons ---------------------------------------------------------------------------


def test_paired_difference_excludes_zero_on_a_clear_effect() -> None:
    pairs = [_outcomes(c, seed=k) for k, c in enumerate([(80, 45, 5, 70), (70, 50, 8, 72)])]
    result = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    assert result.difference == pytest.approx(np.mean([40 / 200, 42 / 200]))
    assert result.excludes_zero and result.ci[0] > 0.1
    assert result.images_paired and result.replicates == 2
    one = paired_difference([pairs[0][0]], [pairs[0][1]])
    assert one.excludes_zero and one.t_ci is None and not one.model_variance_measured


def test_paired_difference_includes_zero_under_no_difference() -> None:
    """As many a-only as b-only images in every replicate: the difference is exactly 0."""
    pairs = [_outcomes(c, seed=k) for k, c in enumerate([(60, 30, 30, 80), (40, 45, 45, 70)])]
    result = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    assert result.difference == 0 and not result.excludes_zero
    assert result.ci[0] < 0 < result.ci[1]


def test_pairing_images_narrows_the_difference_interval() -> None:
    """Outcomes that agree on most images: pairing removes the shared image noise."""
    pairs = [_outcomes((90, 12, 4, 94), seed=k) for k in range(3)]
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    paired = paired_difference(a, b)
    unpaired = paired_difference([Rate(int(x.sum()), len(x)) for x in a],
                                 [Rate(int(y.sum()), len(y)) for y in b])  # fmt: skip
    assert not unpaired.images_paired
    assert paired.difference == pytest.approx(unpaired.difference)
    assert _width(paired.ci) < 0.7 * _width(unpaired.ci)
    assert paired.excludes_zero and not unpaired.excludes_zero


def test_paired_difference_shows_disagreeing_models() -> None:
    """A clear effect in two models and the opposite in a third is no finding."""
    counts = [(50, 40, 0, 110), (50, 40, 0, 110), (50, 0, 40, 110)]
    pairs = [_outcomes(c, seed=k) for k, c in enumerate(counts)]
    result = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    assert result.per_replicate == pytest.approx((0.2, 0.2, -0.2))
    assert not result.excludes_zero
    # Student-t over the three differences: mean 1/15, sd 0.2309, t(2, 0.975) = 4.303
    half = 4.302653 * 0.2309401 / 3**0.5
    assert result.t_ci == pytest.approx((1 / 15 - half, 1 / 15 + half), abs=1e-5)
    assert not result.t_excludes_zero


def test_ratio_and_its_interval() -> None:
    pairs = [_outcomes((50, 0, 50, 100), seed=k) for k in range(3)]  # a is half of b
    result = rate_ratio([a for a, _ in pairs], [b for _, b in pairs])
    assert result.ratio == pytest.approx(0.5)
    assert result.ci[0] < 0.5 < result.ci[1] < 1.0
    assert result.undefined_draws == 0


def test_ratio_with_a_zero_reference() -> None:
    zero = rate_ratio([Rate(3, 100)], [Rate(0, 100)])
    assert zero.ratio is None and zero.ci is None and "undefined" in str(zero)
    both_zero = rate_ratio([Rate(0, 100)], [Rate(0, 100)], n_boot=200)
    assert both_zero.ratio is None and both_zero.undefined_draws == 200
    # a reference rate of 1/100: some draws have none, so the interval is unbounded above
    rare = rate_ratio([Rate(3, 100)], [Rate(1, 100)])
    assert rare.ratio == pytest.approx(3.0) and rare.ci[1] == float("inf")
    json.dumps(rare.to_dict())


def test_paired_inputs_are_checked() -> None:
    a, b = _outcomes((5, 5, 5, 5), seed=0)
    with pytest.raises(ShapeError, match="same images"):
        paired_difference([a], [b[:-1]])
    with pytest.raises(ShapeError, match="replicates"):
        paired_difference([a, a], [b])
    with pytest.raises(ShapeError, match="Rates for all"):
        paired_difference([a], [Rate(3, 20)])
    with pytest.raises(ShapeError, match="one entry"):
        hierarchical_bootstrap([])
    with pytest.raises(ShapeError, match="one entry"):
        hierarchical_bootstrap(torch.ones(5, dtype=torch.bool))
    with pytest.raises(ShapeError, match="boolean"):
        hierarchical_bootstrap([np.array([0.2, 0.7])])
    with pytest.raises(ShapeError, match="1-D"):
        hierarchical_bootstrap([np.ones((2, 2), dtype=bool)])
    with pytest.raises(ShapeError, match="no images"):
        hierarchical_bootstrap([Rate(0, 0)])
    with pytest.raises(ConfigError, match="n_boot"):
        hierarchical_bootstrap([Rate(1, 2)], n_boot=10)


# -- McNemar and the masking check ----------------------------------------------------------------


def test_mcnemar_matches_hand_computed_binomial_tails() -> None:
    # 3 a-only and 1 b-only images: P(X >= 3 | Bin(4, 1/2)) = 5/16, P(X <= 3) = 15/16
    result = mcnemar_exact([1, 1, 1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 0])
    assert (result.both, result.a_only, result.b_only, result.neither) == (2, 3, 1, 2)
    assert result.p_greater == pytest.approx(5 / 16)
    assert result.p_less == pytest.approx(15 / 16)
    assert result.p_two_sided == pytest.approx(10 / 16)
    # 8 a-only, 0 b-only: 1/256 one-sided, 2/256 two-sided
    eight = mcnemar_exact(torch.ones(10, dtype=torch.bool), torch.arange(10) >= 8)
    assert eight.p_greater == pytest.approx(1 / 256) and eight.p_two_sided == pytest.approx(2 / 256)
    assert eight.p_less == pytest.approx(1.0)
    same = mcnemar_exact([1, 0, 1], [1, 0, 1])  # no discordant image: no evidence either way
    assert same.p_two_sided == same.p_greater == same.p_less == 1.0


def test_masking_is_flagged_when_the_query_attack_beats_the_white_box_one() -> None:
    masked = [_outcomes((60, 25, 3, 112), seed=k) for k in range(3)]  # query = a
    result = masking_check([q for q, _ in masked], [w for _, w in masked])
    assert result.flagged and result.p_value < 1e-6 and result.n == 600
    assert result.statement().startswith("masking flagged")
    honest = [_outcomes((60, 3, 25, 112), seed=k) for k in range(3)]
    fine = masking_check([q for q, _ in honest], [w for _, w in honest])
    assert not fine.flagged and fine.min_detectable_excess is not None
    assert "detects a query-only excess" in fine.statement()
    json.dumps(fine.to_dict())


def test_min_detectable_excess_without_white_box_only_images() -> None:
    """With no white-box-only images every discordant image is query-only; the one-sided
    test at 0.05 rejects once there are 5 of them (1/32 <= 0.05 < 1/16), so 80 % power needs
    P(Binomial(n, q) >= 5) = 0.8."""
    q = min_detectable_excess(100, white_box_only=0.0, white_box_rate=0.3)
    assert binom.sf(4, 100, q) == pytest.approx(0.8, abs=1e-6)


def test_min_detectable_excess_has_its_stated_power() -> None:
    """Simulate the test at the returned excess: it rejects about 80 % of the time."""
    n, white_box_only, white_box_rate = 300, 0.05, 0.3
    excess = min_detectable_excess(n, white_box_only, white_box_rate)
    assert excess is not None and 0 < excess < 0.2
    query_only = white_box_only + excess
    rng = np.random.default_rng(0)
    sims = 1500
    cells = rng.multinomial(n, [query_only, white_box_only, 1 - query_only - white_box_only], sims)
    p = binom.sf(cells[:, 0] - 1, cells[:, 0] + cells[:, 1], 0.5)
    assert np.mean(p <= 0.05) == pytest.approx(0.8, abs=0.04)
    # more images detect a smaller excess; too few detect nothing that fits
    assert min_detectable_excess(3000, white_box_only, white_box_rate) < excess
    assert min_detectable_excess(3, 0.0, 0.9) is None


def test_t_interval_keeps_its_level_with_three_disagreeing_models() -> None:
    """No true difference on average, but each model's own difference spreads (sd 0.06):
    the t interval over 3 replicates claims a difference about 5 % of the time, the
    hierarchical bootstrap alone far more often (why the report asks both to agree)."""
    rng = np.random.default_rng(0)
    sims, claims, bootstrap_claims = 200, 0, 0
    for s in range(sims):
        a, b = [], []
        for shift in rng.normal(0, 0.06, 3):
            u = rng.random(400)
            v = np.where(rng.random(400) < 0.8, u, rng.random(400))
            a.append(u < 0.3 + shift / 2)
            b.append(v < 0.3 - shift / 2)
        difference = paired_difference(a, b, n_boot=100, seed=s)
        claims += difference.t_excludes_zero
        bootstrap_claims += difference.excludes_zero
    assert claims / sims <= 0.1
    assert bootstrap_claims / sims >= 0.15
