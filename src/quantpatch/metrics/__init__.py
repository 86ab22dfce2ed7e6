"""Rates with honest uncertainty: every rate carries its n and a 95 % Wilson interval."""

from quantpatch.metrics.rates import (
    Rate,
    accuracy,
    attack_outcomes,
    attack_success,
    difference_interval,
    wilson_interval,
)

__all__ = [
    "Rate",
    "accuracy",
    "attack_outcomes",
    "attack_success",
    "difference_interval",
    "wilson_interval",
]
