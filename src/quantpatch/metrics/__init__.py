"""Rates with honest uncertainty: every rate carries its n and a 95 % Wilson interval, and
rates over trained replicates carry a hierarchical-bootstrap interval over models x images."""

from quantpatch.metrics.rates import (
    Rate,
    accuracy,
    attack_outcomes,
    attack_success,
    difference_interval,
    wilson_interval,
)
from quantpatch.metrics.replicates import (
    MaskingCheck,
    McNemarResult,
    PairedDifference,
    RateRatio,
    ReplicateRate,
    hierarchical_bootstrap,
    masking_check,
    mcnemar_exact,
    min_detectable_excess,
    paired_difference,
    rate_ratio,
)

__all__ = [
    "MaskingCheck",
    "McNemarResult",
    "PairedDifference",
    "Rate",
    "RateRatio",
    "ReplicateRate",
    "accuracy",
    "attack_outcomes",
    "attack_success",
    "difference_interval",
    "hierarchical_bootstrap",
    "masking_check",
    "mcnemar_exact",
    "min_detectable_excess",
    "paired_difference",
    "rate_ratio",
    "wilson_interval",
]
