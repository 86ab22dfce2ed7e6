"""Reshape result records into the tables and matrices the report shows (no plotting here)."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from quantpatch.metrics import wilson_interval

MASKING_MARGIN = 0.05


def precision_order(precision: str) -> tuple:
    """fp32 first, then higher bit-widths first, ORT int8 last."""
    if precision == "fp32":
        return (0, 0, 0)
    if precision == "ort-int8":
        return (2, 0, 0)
    match = re.match(r"w(\d+)a(\d+)", precision)
    if match:
        return (1, -int(match.group(1)), -int(match.group(2)))
    return (1, 0, 0)


def model_order(name: str) -> tuple:
    arch, _, precision = name.partition("/")
    return (arch, precision_order(precision))


@dataclass(frozen=True)
class PooledRate:
    """A rate pooled over seeds: mean over seeds, spread, pooled Wilson interval."""

    rate: float
    spread: float
    successes: int
    n: int
    seeds: int

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.n)

    def fmt(self) -> str:
        low, high = self.ci
        spread = f" ±{100 * self.spread:.1f}" if self.seeds > 1 else ""
        return f"{100 * self.rate:.1f}%{spread} [{100 * low:.0f}–{100 * high:.0f}] n={self.n}"


def pool(records: Iterable[dict[str, Any]]) -> PooledRate | None:
    records = list(records)
    if not records:
        return None
    rates = [r["rate"] for r in records if r["n"]]
    return PooledRate(
        rate=statistics.fmean(rates) if rates else float("nan"),
        spread=statistics.stdev(rates) if len(rates) > 1 else 0.0,
        successes=sum(r["successes"] for r in records),
        n=sum(r["n"] for r in records),
        seeds=len({r["seed"] for r in records}),
    )


def group(records: Iterable[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        grouped[tuple(record[k] for k in keys)].append(record)
    return grouped


def transfer_matrix(
    records: list[dict[str, Any]], attack: str, patch_size: int | None
) -> tuple[list[str], list[str], dict[tuple[str, str], PooledRate]]:
    """Sources x targets for one attack and size; white-box cells sit on the diagonal."""
    chosen = [r for r in records if r["attack"] == attack and r["patch_size"] == patch_size]
    cells = {key: pool(rows) for key, rows in group(chosen, "source", "target").items()}
    sources = sorted({s for s, _ in cells}, key=model_order)
    targets = sorted({t for _, t in cells}, key=model_order)
    return sources, targets, cells  # type: ignore[return-value]


def attack_sizes(records: list[dict[str, Any]]) -> list[tuple[str, int | None]]:
    seen = {(r["attack"], r["patch_size"]) for r in records}
    return sorted(seen, key=lambda item: (item[0], item[1] or 0))


def masking_flags(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Quantized targets where fp32-sibling transfer beats white-box ASR by > 5 points.

    Straight-through gradients can mislead a white-box attacker (gradient masking); a transfer
    attack from the float sibling that does better is the tell-tale sign."""
    flags = []
    for (attack, size), _ in group(records, "attack", "patch_size").items():
        _, _, cells = transfer_matrix(records, attack, size)
        for (source, target), white in cells.items():
            arch, _, precision = target.partition("/")
            if source != target or precision in ("fp32", "ort-int8"):
                continue
            transfer = cells.get((f"{arch}/fp32", target))
            if transfer is None:
                continue
            flags.append(
                {
                    "attack": attack,
                    "patch_size": size,
                    "target": target,
                    "white_box": white.rate,
                    "fp32_transfer": transfer.rate,
                    "flagged": transfer.rate - white.rate > MASKING_MARGIN,
                }
            )
    return flags
