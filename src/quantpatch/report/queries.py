""" "Query-only vs gradient": for every target a query attack ran on, its query-only ASR beside
the best white-box gradient attack of the same kind (patch or pixel) and the best transfer from
the fp32 sibling.

A query attack sees nothing but the target's logits, so it cannot be fooled by misleading
straight-through gradients; where it succeeds on images the white-box gradient attack does
not, more often than chance allows (a paired one-sided test on the same images and models),
the gradient numbers on that target understate it: gradient masking. A "no flag" states
the smallest excess the test could have seen at its n."""

from __future__ import annotations

from dataclasses import dataclass

from quantpatch.metrics import MaskingCheck, masking_check
from quantpatch.report.page import Page
from quantpatch.report.tables import ModelOrder, SeedRate, group, paired_outcomes, pool
from quantpatch.results import CellRecord, ModelRecord


@dataclass(frozen=True)
class QueryRow:
    """One target, one patch size: the three threat models side by side."""

    target: str
    patch_size: int | None
    query_attack: str
    query_only: SeedRate
    mean_queries: float | None
    white_box: tuple[str, SeedRate] | None
    fp32_transfer: tuple[str, SeedRate] | None

    @property
    def check(self) -> MaskingCheck | None:
        """The paired one-sided test of query-only over the best white-box attack (None
        without a white-box attack, or without per-image outcomes)."""
        if self.white_box is None:
            return None
        paired = paired_outcomes(self.query_only, self.white_box[1])
        if paired is None or not sum(len(x) for x in paired[0]):
            return None
        return masking_check(*paired)

    @property
    def masking(self) -> bool:
        """Query-only beats the best white-box gradient attack: the paired test where
        outcomes were recorded, else interval above interval."""
        check = self.check
        if check is not None:
            return check.flagged
        return self.white_box is not None and self.query_only.ci[0] > self.white_box[1].ci[1]


def query_rows(records: list[CellRecord], order: ModelOrder) -> list[QueryRow]:
    """A row per (target, patch size, query attack) with query-only cells, in model order."""
    rows = []
    queries = [r for r in records if r.threat == "query-only"]
    for (target, size, attack), cells in group(queries, "target", "patch_size", "attack").items():
        rate = pool(cells)
        assert rate is not None
        kind = cells[0].attack_kind
        known = [c.mean_queries for c in cells if c.mean_queries is not None]
        arch = target.partition("/")[0]
        rows.append(
            QueryRow(
                target=target,
                patch_size=size,
                query_attack=attack,
                query_only=rate,
                mean_queries=sum(known) / len(known) if known else None,
                white_box=_best(records, kind, size, target, "white-box"),
                fp32_transfer=_best(records, kind, size, target, "transfer", f"{arch}/fp32"),
            )
        )
    return sorted(rows, key=lambda row: (order(row.target), row.patch_size or 0, row.query_attack))


def _best(
    records: list[CellRecord],
    kind: str,
    size: int | None,
    target: str,
    threat: str,
    source: str | None = None,
) -> tuple[str, SeedRate] | None:
    """The gradient attack of ``kind`` with the highest ASR on ``target`` under ``threat``
    (from ``source`` when given), or None."""
    queries = _query_attacks(records)
    chosen = [
        r for r in records
        if r.attack_kind == kind and r.patch_size == size and r.target == target
        and r.threat == threat and (source is None or r.source == source)
        and r.attack not in queries
    ]  # fmt: skip
    pooled = [(attack, pool(cells)) for (attack,), cells in group(chosen, "attack").items()]
    pooled = [(attack, rate) for attack, rate in pooled if rate is not None and rate.n]
    return max(pooled, key=lambda item: item[1].rate, default=None)


def _query_attacks(records: list[CellRecord]) -> set[str]:
    """Labels of the query attacks (they are the ones with query-only cells)."""
    return {r.attack for r in records if r.threat == "query-only"}


def query_section(
    page: Page, records: list[CellRecord], models: list[ModelRecord], order: ModelOrder
) -> None:
    rows = query_rows(records, order)
    if not rows:
        return
    page.heading("Query-only vs gradient attacks")
    page.para(
        "Per target: ASR of a query-only attack that saw only the target's logits, the best "
        "white-box gradient attack of the same kind on it (patch, or pixel for an L∞ query "
        "attack), and the best transfer from its fp32 sibling (same patch size). Runtime "
        "targets have no gradient, so query-only is their only white-box threat. The masking "
        "check is a paired one-sided exact test on the same images and models (query-only "
        "fooled where white-box did not, more often than the reverse, α = 0.05); where it "
        "finds nothing it says the smallest excess it would have found with 80 % power."
    )
    table = []
    for row in rows:
        white = f"{row.white_box[1].fmt()} ({row.white_box[0]})" if row.white_box else "n/a"
        transfer = (f"{row.fp32_transfer[1].fmt()} ({row.fp32_transfer[0]})"
                    if row.fp32_transfer else "n/a")  # fmt: skip
        queries = f"{row.mean_queries:.0f}" if row.mean_queries is not None else "-"
        flag = '<span class="flag">gradient masking</span>' if row.masking else "ok"
        check = row.check
        power = (f"≥ {100 * check.min_detectable_excess:.1f} points"
                 if check is not None and check.min_detectable_excess is not None else "n/a")  # fmt: skip
        table.append([row.target, f"{row.query_attack} {row.patch_size or ''}",
                      row.query_only.fmt(), queries, white, transfer, flag, power])  # fmt: skip
    page.table(["target", "query attack", "query-only ASR", "queries / image",
                "best white-box gradient", "best fp32 transfer", "flag",
                "excess a no-flag rules out"], table)  # fmt: skip
