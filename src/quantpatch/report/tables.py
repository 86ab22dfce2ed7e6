"""Reshape result records into the tables and matrices the report shows (no plotting here)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from quantpatch.metrics import Rate, wilson_interval
from quantpatch.results import CellRecord, ModelRecord, RateRecord, precision_order


class ModelOrder:
    """Sort key for model names: by architecture, fp32 first, then higher bit-widths first,
    other runtimes (ORT int8) last; names that are not models (multibit, none) after those.
    Built from the model records' bits, so no precision name is ever parsed."""

    def __init__(self, models: Iterable[ModelRecord]) -> None:
        self._rank = {m.name: self._model_rank(m) for m in models}

    @staticmethod
    def _model_rank(m: ModelRecord) -> tuple:
        is_float = m.weight_bits is None and m.act_bits is None
        group = 3 if m.runtime != "torch" else (0 if is_float and not m.control_of else 1)
        group = 2 if not is_float and group == 1 else group  # fp32, controls, quantized, ORT
        weight, act = precision_order(m.weight_bits, m.act_bits)
        return (m.arch, group, -weight, -act, m.precision, m.defense or "")

    def __call__(self, name: str) -> tuple:
        arch, _, precision = name.partition("/")
        return self._rank.get(name, (arch, 4, 0, 0, precision, ""))


@dataclass(frozen=True)
class SeedRate:
    """One cell's rate over seeds that reuse the same evaluation images.

    ``rate`` is the mean over seeds; ``n`` the images per seed (seeds are not more images, so
    they are never summed into n); ``ci`` the Wilson interval at that n; ``spread`` the
    sample standard deviation across seeds; ``per_seed`` each seed's own rate."""

    rate: float
    n: int
    spread: float
    per_seed: tuple[Rate, ...]

    @property
    def seeds(self) -> int:
        return len(self.per_seed)

    @property
    def ci(self) -> tuple[float, float]:
        successes = round(self.rate * self.n) if self.n else 0
        return wilson_interval(successes, self.n)

    def fmt(self) -> str:
        low, high = self.ci
        spread = f" ±{100 * self.spread:.1f} sd over {self.seeds} seeds" if self.seeds > 1 else ""
        return f"{100 * self.rate:.1f}% [{100 * low:.0f}–{100 * high:.0f}] n={self.n}{spread}"


def pool(records: Iterable[CellRecord]) -> SeedRate | None:
    """The records of one (source, target, attack, size) over its seeds."""
    records = sorted(records, key=lambda r: r.seed)
    if not records:
        return None
    if len({r.seed for r in records}) != len(records):
        raise ValueError("pool() takes one record per seed; group by attack label and size first")
    per_seed = tuple(Rate(r.successes, r.n) for r in records)
    rates = [r.rate for r in per_seed if r.n]
    return SeedRate(
        rate=statistics.fmean(rates) if rates else float("nan"),
        n=max(r.n for r in per_seed),
        spread=statistics.stdev(rates) if len(rates) > 1 else 0.0,
        per_seed=per_seed,
    )


def group(records: Iterable[CellRecord], *fields: str) -> dict[tuple, list[CellRecord]]:
    grouped: dict[tuple, list[CellRecord]] = defaultdict(list)
    for record in records:
        grouped[tuple(getattr(record, f) for f in fields)].append(record)
    return grouped


def transfer_matrix(
    records: list[CellRecord], attack: str, patch_size: int | None, order: ModelOrder
) -> tuple[list[str], list[str], dict[tuple[str, str], SeedRate]]:
    """Sources x targets for one attack and size; white-box cells sit on the diagonal."""
    chosen = [r for r in records if r.attack == attack and r.patch_size == patch_size]
    cells = {key: pool(rows) for key, rows in group(chosen, "source", "target").items()}
    sources = sorted({s for s, _ in cells}, key=order)
    targets = sorted({t for _, t in cells}, key=order)
    return sources, targets, cells  # type: ignore[return-value]


def attack_sizes(records: list[CellRecord]) -> list[tuple[str, int | None]]:
    seen = {(r.attack, r.patch_size) for r in records}
    return sorted(seen, key=lambda item: (item[0], item[1] or 0))


def crafted_attacks(cells: list[CellRecord]) -> list[tuple[str, int | None]]:
    """(attack, size) of the attacks crafted on a model (the random patch needs none)."""
    return sorted({(c.attack, c.patch_size) for c in cells if c.threat != "source-free"},
                  key=lambda item: (item[0], item[1] or 0))  # fmt: skip


def masking_flags(
    records: list[CellRecord], models: list[ModelRecord], order: ModelOrder
) -> list[dict]:
    """Quantized PyTorch targets where fp32-sibling transfer beats white-box ASR beyond the
    intervals (transfer's lower bound above white-box's upper bound).

    Straight-through gradients can mislead a white-box attacker (gradient masking); a transfer
    attack from the float sibling that does better is the tell-tale sign."""
    quantized = {m.name for m in models if m.runtime == "torch" and (m.weight_bits or m.act_bits)}
    flags = []
    queries = {r.attack for r in records if r.threat == "query-only"}  # cannot be masked
    for (attack, size), _ in group(records, "attack", "patch_size").items():
        if attack in queries:
            continue
        _, _, cells = transfer_matrix(records, attack, size, order)
        for (source, target), white in cells.items():
            if source != target or target not in quantized:
                continue
            arch = target.partition("/")[0]
            transfer = cells.get((f"{arch}/fp32", target))
            if transfer is None:
                continue
            flags.append(
                {
                    "attack": attack,
                    "patch_size": size,
                    "target": target,
                    "white_box": white,
                    "fp32_transfer": transfer,
                    "flagged": transfer.ci[0] > white.ci[1],
                }
            )
    return flags


def fmt_rate(rate: RateRecord) -> str:
    return (f"{100 * rate.rate:.1f}% [{100 * rate.ci_low:.1f}, {100 * rate.ci_high:.1f}]"
            f" n={rate.n}")  # fmt: skip
