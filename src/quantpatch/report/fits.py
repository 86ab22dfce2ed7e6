"""The "Fit curves" section: how every universal patch's training went and where its batch
success plateaus, so step budgets rest on evidence; and the two placement threat models (EOT
over random placements vs the best fixed location a search found) side by side."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from quantpatch.report import figures  # sets the Agg backend and the style
from quantpatch.report.page import Page
from quantpatch.report.tables import ModelOrder, group, pool
from quantpatch.results import CellRecord, CurvePoint

PLATEAU_SHARE = 0.95
"""A curve has plateaued at the first step whose batch success reaches this share of its
final success."""


@dataclass(frozen=True)
class Curve:
    """One source's fit curve for one attack and patch size, averaged over its seeds."""

    source: str
    steps: list[int]
    loss: list[float]
    success: list[float]
    seeds: int
    location: tuple[int, int] | None

    @property
    def final(self) -> float:
        return self.success[-1]

    @property
    def plateau(self) -> int:
        return plateau_step(self.steps, self.success)


def plateau_step(steps: list[int], success: list[float], share: float = PLATEAU_SHARE) -> int:
    """The first step whose success reaches ``share`` of the final success."""
    if not steps or len(steps) != len(success):
        raise ValueError("need one success per step, at least one")
    final = success[-1]
    return next(step for step, value in zip(steps, success, strict=True) if value >= share * final)


def fit_curves(
    cells: list[CellRecord], order: ModelOrder
) -> dict[tuple[str, int | None], list[Curve]]:
    """(attack label, patch size) -> one averaged curve per source, in model order. Every
    target record of a cell carries the same curve, so each (source, seed) counts once;
    seeds whose steps differ from the first seed's are left out of the average."""
    out: dict[tuple[str, int | None], list[Curve]] = {}
    with_curves = [c for c in cells if c.fit_curve]
    for (attack, size, source), rows in group(
        with_curves, "attack", "patch_size", "source"
    ).items():
        per_seed: dict[int, CellRecord] = {}
        for row in rows:
            per_seed.setdefault(row.seed, row)
        first = per_seed[min(per_seed)]
        curves = [_points(r) for _, r in sorted(per_seed.items())]
        steps = [p.step for p in curves[0]]
        same = [c for c in curves if [p.step for p in c] == steps]
        out.setdefault((attack, size), []).append(
            Curve(
                source=source,
                steps=steps,
                loss=[statistics.fmean(c[i].loss for c in same) for i in range(len(steps))],
                success=[statistics.fmean(c[i].success for c in same) for i in range(len(steps))],
                seeds=len(same),
                location=first.patch_location,
            )
        )
    for curves in out.values():
        curves.sort(key=lambda c: order(c.source))
    return dict(sorted(out.items(), key=lambda item: (item[0][0], item[0][1] or 0)))


def _points(record: CellRecord) -> list[CurvePoint]:
    assert record.fit_curve is not None
    return record.fit_curve


def fit_curve_figure(curves: list[Curve], title: str) -> Figure:
    """Two panels against the step: mean batch loss and batch success, one line per source."""
    fig, (loss_ax, success_ax) = plt.subplots(1, 2, figsize=(12, 3.6))
    for k, curve in enumerate(curves):
        # a dash pattern and marker per source: curves that coincide stay visible
        style = {"linestyle": figures.LINE_STYLES[k % len(figures.LINE_STYLES)],
                 "marker": figures.MARKERS[k % len(figures.MARKERS)], "markevery": 0.1,
                 "markersize": 4}  # fmt: skip
        (line,) = loss_ax.plot(curve.steps, curve.loss, label=curve.source, **style)
        success_ax.plot(curve.steps, [100 * v for v in curve.success], color=line.get_color(),
                        **style)  # fmt: skip
        success_ax.axvline(curve.plateau, color=line.get_color(), linestyle=":", linewidth=1)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("mean batch cross-entropy")
    success_ax.set_xlabel("step")
    success_ax.set_ylabel("batch success (%)")
    success_ax.set_ylim(0, 100)
    handles, labels = loss_ax.get_legend_handles_labels()
    success_ax.legend(
        handles, labels, frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0)
    )  # right of the panels: never over a curve
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def fit_section(page: Page, cells: list[CellRecord], order: ModelOrder) -> None:
    curves = fit_curves(cells, order)
    if not curves:
        return
    page.heading("Fit curves")
    page.para(
        "Training loss and batch success of every universal patch (mean over the steps between "
        "points and over seeds). Batch success is the share of patched training images that "
        "fool the source model(s), clean-wrong images included, so it tracks, but is not, the "
        f"evaluated ASR. Dotted lines: the first step reaching {PLATEAU_SHARE:.0%} of the final "
        "batch success."
    )
    for (attack, size), group_curves in curves.items():
        label = attack + (f", {size} px" if size else "")
        page.figure(fit_curve_figure(group_curves, label), f"fit_curve_{attack}_{size}",
                    f"{label}: loss (left) and batch success (right) against the step.")  # fmt: skip
        page.para(_plateau_sentence(label, group_curves), cls="finding")
        rows = [[c.source, f"{100 * c.final:.1f}%", str(c.plateau), str(c.steps[-1]),
                 str(c.seeds)] for c in group_curves]  # fmt: skip
        header = ["source", "final batch success", "plateau step", "steps", "seeds"]
        if any(c.location is not None for c in group_curves):  # no empty column
            header.append("searched location (top, left)")
            for row, c in zip(rows, group_curves, strict=True):
                row.append("–" if c.location is None else str(c.location))
        page.table(header, rows)
    _threat_models(page, cells, order)


def _plateau_sentence(label: str, curves: list[Curve]) -> str:
    steps = curves[0].steps[-1]
    latest = max(curves, key=lambda c: c.plateau)
    if all(c.final == 0 for c in curves):
        return f"{label}: no source's patch fools a training batch in {steps} steps."
    share = latest.plateau / max(steps, 1)
    verdict = (
        "still rising late in the budget"
        if share > 0.8
        else f"flat for the last {1 - share:.0%} of the budget"
    )
    return (
        f"{label}: batch success reaches {PLATEAU_SHARE:.0%} of its final value by step "
        f"{latest.plateau} of {steps} at the latest ({latest.source}, final "
        f"{100 * latest.final:.1f}%); {verdict}."
    )


def _threat_models(page: Page, cells: list[CellRecord], order: ModelOrder) -> None:
    """White-box ASR per source of EOT universal patches next to searched fixed locations."""
    searched = {c.attack for c in cells if c.patch_location is not None}
    eot = {c.attack for c in cells if c.attack_name in ("universal", "multibit")}
    if not searched or not eot:
        return
    white = [c for c in cells if c.threat in ("white-box", "white-box ensemble")]
    labels = sorted({(c.attack, c.patch_size) for c in white if c.attack in searched | eot},
                    key=lambda item: (item[0] in searched, item[0], item[1] or 0))  # fmt: skip
    targets = sorted({c.target for c in white if c.attack in searched | eot}, key=order)
    by_key = group(white, "attack", "patch_size", "target")
    rows = []
    for attack, size in labels:
        kind = "best fixed location" if attack in searched else "EOT random placement"
        row = [f"{attack} {size or ''}px ({kind})"]
        for target in targets:
            rate = pool(by_key.get((attack, size, target), []))
            row.append("–" if rate is None else rate.fmt())
        rows.append(row)
    page.heading("Placement threat models", 3)
    page.para(
        "White-box ASR of universal patches placed at random (rotated) positions (EOT, Brown et "
        "al.) and of patches trained and pasted at the best fixed location a search found "
        "(LaVAN threat model), per precision."
    )
    page.table(["attack", *targets], rows)
