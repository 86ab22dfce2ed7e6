"""Reshape result records into the tables and matrices the report shows (no plotting here)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from quantpatch.metrics import Rate, hierarchical_bootstrap, wilson_interval
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
    """One cell's rate over its seeds and trained replicates.

    Seeds reuse the same evaluation images, so they are averaged, never summed into n:
    ``n`` is the images per seed. ``per_replicate`` is each trained model's seed-mean rate
    (as a count at its n); with several replicates ``ci`` is the hierarchical bootstrap over
    models, then images, so the variance between trained models shows; with one it is the
    Wilson interval at n (images only). ``rate`` is the mean over replicates; ``spread`` the
    sample standard deviation across the seeds of the first replicate."""

    rate: float
    n: int
    spread: float
    per_seed: tuple[Rate, ...]
    per_replicate: tuple[Rate, ...] = ()
    cells: tuple[CellRecord, ...] = field(default=(), repr=False, compare=False)
    """The records pooled (for paired tests on the same images and models)."""

    @property
    def seeds(self) -> int:
        return len(self.per_seed)

    @property
    def replicates(self) -> int:
        return max(1, len(self.per_replicate))

    @cached_property
    def ci(self) -> tuple[float, float]:
        if self.replicates > 1:
            return hierarchical_bootstrap(self.per_replicate, seed=BOOTSTRAP_SEED).ci
        successes = round(self.rate * self.n) if self.n else 0
        return wilson_interval(successes, self.n)

    def outcomes(self) -> dict[int, str]:
        """Per replicate, the first seed's per-image outcomes ('' when not recorded)."""
        first: dict[int, CellRecord] = {}
        for cell in sorted(self.cells, key=lambda c: (c.replicate, c.seed)):
            first.setdefault(cell.replicate, cell)
        return {k: c.outcomes or "" for k, c in first.items()}

    def fmt(self) -> str:
        low, high = self.ci
        spread = f" ±{100 * self.spread:.1f} sd over {self.seeds} seeds" if self.seeds > 1 else ""
        models = f" over {self.replicates} models" if self.replicates > 1 else ""
        return (
            f"{100 * self.rate:.1f}% [{100 * low:.0f}–{100 * high:.0f}] n={self.n}{models}{spread}"
        )


BOOTSTRAP_SEED = 0
"""Every interval of a report is seeded: the same results give the same report."""


def pool(records: Iterable[CellRecord]) -> SeedRate | None:
    """The records of one (source, target, attack, size) over its seeds and replicates."""
    records = sorted(records, key=lambda r: (r.replicate, r.seed))
    if not records:
        return None
    if len({(r.replicate, r.seed) for r in records}) != len(records):
        raise ValueError("pool() takes one record per seed and replicate; group by attack "
                         "label and size first")  # fmt: skip
    by_replicate = group(records, "replicate")
    per_replicate = []
    for rows in by_replicate.values():
        rates = [r.rate for r in rows if r.n]
        n = max(r.n for r in rows)
        mean = statistics.fmean(rates) if rates else 0.0
        per_replicate.append(Rate(round(mean * n), n))
    first = next(iter(by_replicate.values()))
    per_seed = tuple(Rate(r.successes, r.n) for r in first)
    seed_rates = [r.rate for r in per_seed if r.n]
    replicate_rates = [r.rate for r in per_replicate if r.n]
    return SeedRate(
        rate=statistics.fmean(replicate_rates) if replicate_rates else float("nan"),
        n=max(r.n for r in per_seed),
        spread=statistics.stdev(seed_rates) if len(seed_rates) > 1 else 0.0,
        per_seed=per_seed,
        per_replicate=tuple(per_replicate),
        cells=tuple(records),
    )


def clean_by_model(models: Iterable[ModelRecord]) -> dict[str, SeedRate]:
    """Each model's clean accuracy over its trained replicates: their mean, with the
    hierarchical interval (models, then images) when there are several, else Wilson's."""
    by_name: dict[str, list[ModelRecord]] = defaultdict(list)
    for model in sorted(models, key=lambda m: m.replicate):
        by_name[model.name].append(model)
    clean = {}
    for name, records in by_name.items():
        per_replicate = tuple(Rate(m.clean.successes, m.clean.n) for m in records)
        clean[name] = SeedRate(
            rate=statistics.fmean(r.rate for r in per_replicate),
            n=per_replicate[0].n,
            spread=0.0,
            per_seed=per_replicate[:1],
            per_replicate=per_replicate if len(per_replicate) > 1 else (),
        )
    return clean


def paired_or_rates(a: SeedRate, b: SeedRate) -> tuple[list, list]:
    """What a paired test of ``a`` against ``b`` takes: per-image outcomes on the same images
    and replicates where recorded, else each replicate's rate (replicates paired only)."""
    paired = paired_outcomes(a, b)
    return paired if paired is not None else (list(a.per_replicate), list(b.per_replicate))


def paired_outcomes(a: SeedRate, b: SeedRate) -> tuple[list, list] | None:
    """Each replicate's per-image outcomes of ``a`` and ``b`` on the images both count, for
    paired tests (same images, same trained models); None when outcomes were not recorded."""
    outcomes_a, outcomes_b = a.outcomes(), b.outcomes()
    shared = sorted(set(outcomes_a) & set(outcomes_b))
    if not shared or any(not outcomes_a[k] or not outcomes_b[k] for k in shared):
        return None
    pairs_a, pairs_b = [], []
    for k in shared:
        x, y = outcomes_a[k], outcomes_b[k]
        if len(x) != len(y):
            return None
        both = [i for i in range(len(x)) if x[i] != "." and y[i] != "."]
        pairs_a.append(np.array([x[i] == "1" for i in both], dtype=bool))
        pairs_b.append(np.array([y[i] == "1" for i in both], dtype=bool))
    return pairs_a, pairs_b


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
