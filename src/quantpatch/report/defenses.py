"""The "Defences" section: what each defence costs in clean accuracy and buys against patches,
per bit-width, under the non-adaptive and the adaptive threat model, and PatchCleanser's
certificates. Built from result records only; absent when the study has no defences."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from quantpatch.metrics import paired_difference  # noqa: E402
from quantpatch.report.page import Page  # noqa: E402
from quantpatch.report.tables import (  # noqa: E402
    BOOTSTRAP_SEED,
    ModelOrder,
    SeedRate,
    crafted_attacks,
    group,
    paired_or_rates,
    pool,
)
from quantpatch.results import CellRecord, ModelRecord, ResultsFile  # noqa: E402

UNDEFENDED = "none"
VIA = {
    "exact": "exact gradients",
    "bpda": "BPDA (straight-through)",
    "underlying-model": "attacks the model behind it (forward-only)",
    "surrogate": "through its differentiable surrogate (soft vote or mean over masks)",
}


def base_name(model: ModelRecord) -> str:
    """The undefended model behind a (possibly defended) target."""
    return f"{model.arch}/{model.precision}"


@dataclass(frozen=True)
class Point:
    """One target under one attack: its clean accuracy (over its trained replicates) and the
    ASR it is shown with."""

    model: ModelRecord
    clean: SeedRate
    asr: SeedRate | None
    adaptive: bool
    source: str


@dataclass(frozen=True)
class Gap:
    """Adaptive vs non-adaptive ASR on one defended target, for one attack and size."""

    model: ModelRecord
    attack: str
    patch_size: int | None
    source: str
    non_adaptive: SeedRate | None
    adaptive: SeedRate | None
    via: str | None

    @property
    def same_cells(self) -> bool:
        """A forward-only defence's adaptive attack is the undefended model's own white-box
        attack: the very cells the non-adaptive column reads, so there is no gap to show."""
        return self.via == "underlying-model" and self.source == base_name(self.model)

    def difference(self) -> tuple[float, float, float] | None:
        """(adaptive - non-adaptive, 95 % low, high), paired on the same images and trained
        models; with several replicates the union of the bootstrap and the Student-t interval
        over replicates (the bootstrap alone overclaims at a few models)."""
        if self.adaptive is None or self.non_adaptive is None or self.same_cells:
            return None
        if not self.adaptive.n or not self.non_adaptive.n:
            return None  # no eligible image on one side: no rate to compare
        diff = paired_difference(*paired_or_rates(self.adaptive, self.non_adaptive),
                                 seed=BOOTSTRAP_SEED)  # fmt: skip
        low, high = diff.ci
        if diff.t_ci is not None:
            low, high = min(low, diff.t_ci[0]), max(high, diff.t_ci[1])
        return diff.difference, low, high


def distinct_models(results: ResultsFile) -> list[ModelRecord]:
    """One record per model name (the first replicate's): rows and points are per model,
    their rates pooled over every replicate."""
    first: dict[str, ModelRecord] = {}
    for model in results.models:
        first.setdefault(model.name, model)
    return list(first.values())


def _non_adaptive_source(model: ModelRecord, by_pair: dict[tuple, list[CellRecord]]) -> str:
    """The undefended model itself when it was a source; else (ORT int8) its fp32 sibling."""
    base = base_name(model)
    return base if (base, model.name) in by_pair else f"{model.arch}/fp32"


def gaps(results: ResultsFile, attack: str, size: int | None) -> list[Gap]:
    """One row per defended target: non-adaptive (crafted on the undefended model, scored
    behind the defence) next to adaptive (crafted knowing the defence)."""
    chosen = [c for c in results.cells if c.attack == attack and c.patch_size == size]
    by_pair = group(chosen, "source", "target")
    adaptive = group([c for c in chosen if c.adaptive], "target")
    rows = []
    for model in (m for m in distinct_models(results) if m.defense):
        source = _non_adaptive_source(model, by_pair)
        mine = adaptive.get((model.name,), [])
        rows.append(Gap(model, attack, size, source, pool(by_pair.get((source, model.name), [])),
                        pool(mine), mine[0].adaptive_via if mine else None))  # fmt: skip
    return rows


def points(
    results: ResultsFile, attack: str, size: int | None, clean: dict[str, SeedRate]
) -> list[Point]:
    """Every target (undefended ones included) with the strongest ASR the grid measured for
    it: white-box (adaptive behind a defence) where there is one, else transfer; ``clean``:
    each model's clean accuracy by name."""
    chosen = [c for c in results.cells if c.attack == attack and c.patch_size == size]
    by_pair = group(chosen, "source", "target")
    adaptive = group([c for c in chosen if c.adaptive], "target")
    out = []
    for model in distinct_models(results):
        if (model.name,) in adaptive:
            out.append(Point(model, clean[model.name], pool(adaptive[(model.name,)]), True,
                             "adaptive"))  # fmt: skip
            continue
        if model.defense is None and (model.name, model.name) in by_pair:
            out.append(Point(model, clean[model.name], pool(by_pair[(model.name, model.name)]),
                             True, model.name))  # fmt: skip
            continue
        source = _non_adaptive_source(model, by_pair)
        out.append(Point(model, clean[model.name], pool(by_pair.get((source, model.name), [])),
                         False, source))  # fmt: skip
    return out


def tradeoff_figure(points: list[Point], order: ModelOrder) -> Figure:
    """Clean accuracy (y) vs ASR (x) per architecture: one colour per defence, its
    bit-widths joined from fp32 to the lowest (then ORT int8), one marker per precision;
    filled = white-box/adaptive ASR, hollow = transfer only. Up and left is better."""
    archs = sorted({p.model.arch for p in points})
    # undefended last, in black, so it is drawn on top of defences that change nothing
    defenses = [*sorted({p.model.defense for p in points if p.model.defense}), UNDEFENDED]
    ordered = sorted(points, key=lambda p: order(base_name(p.model)))
    kinds = dict.fromkeys(base_name(p.model).partition("/")[2] for p in ordered)
    markers = dict(zip(kinds, "osD^vP*Xph<>" * 4, strict=False))
    colours = {d: plt.cm.tab10(i % 10) for i, d in enumerate(defenses)} | {UNDEFENDED: "black"}
    fig, axes = plt.subplots(1, len(archs), figsize=(4.6 * len(archs), 3.8), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for defense in defenses:
            mine = sorted((p for p in points if p.model.arch == arch and p.asr is not None
                           and (p.model.defense or UNDEFENDED) == defense),
                          key=lambda p: order(base_name(p.model)))  # fmt: skip
            if mine:
                _trace(ax, mine, colours[defense], markers, defense)
        ax.set_title(arch)
        ax.set_xlabel("ASR (%)")
        ax.set_ylabel("clean accuracy (%)")
        ax.set_xlim(-2, 102)
    handles = [plt.Line2D([], [], color=colours[d], label=d) for d in defenses]
    handles += [plt.Line2D([], [], color="gray", marker=m, linestyle="", label=p)
                for p, m in markers.items()]  # fmt: skip
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def _trace(ax, mine: list[Point], colour, markers: dict[str, str], label: str) -> None:
    xs = [100 * p.asr.rate for p in mine]
    ys = [100 * p.clean.rate for p in mine]
    ax.plot(xs, ys, color=colour, linewidth=1, alpha=0.6, label=label)
    for p, x, y in zip(mine, xs, ys, strict=True):
        low, high = p.asr.ci
        ax.errorbar(
            x, y, xerr=[[x - 100 * low], [100 * high - x]],
            yerr=[[y - 100 * p.clean.ci[0]], [100 * p.clean.ci[1] - y]],
            color=colour, marker=markers[base_name(p.model).partition("/")[2]],
            markerfacecolor=colour if p.adaptive else "white", capsize=2, linewidth=0.8,
        )  # fmt: skip


def defenses_section(
    page: Page, results: ResultsFile, order: ModelOrder, clean: dict[str, SeedRate]
) -> None:
    """The whole section; nothing when no target has a defence. ``clean``: each model's clean
    accuracy over its trained replicates, by name."""
    if not any(m.defense for m in results.models):
        return
    page.heading("Defences")
    page.para(
        "Every model is also evaluated behind every defence ('<model>+<defence>'). "
        "Non-adaptive: adversarial images crafted on the undefended model, scored behind the "
        "defence (ORT int8 has no gradients: crafted on its fp32 sibling). Adaptive: the "
        "attack crafted white-box through the defence, with exact gradients where it is "
        "differentiable and straight-through ones (BPDA) where it is not; a certified "
        "defence is attacked through its differentiable surrogate (derandomized smoothing: "
        "the soft vote; PatchCleanser: the mean softmax over its one-mask images), and no "
        "attack can beat its certificate on a certified image. No defence is randomised, so "
        "no expectation over transformations is needed."
    )
    for attack, size in crafted_attacks(results.cells):
        label = attack + (f", {size} px" if size else "")
        page.heading(f"Clean accuracy vs ASR: {label}", 3)
        page.figure(tradeoff_figure(points(results, attack, size, clean), order),
                    f"defenses_{attack}_{size}",
                    "Each colour a defence ('none': undefended), each marker a precision, "
                    "joined from fp32 down the bit-widths; filled: white-box or adaptive ASR, "
                    "hollow: transfer only (ORT int8); bars are 95 % Wilson intervals. Up and "
                    "to the left is better.")  # fmt: skip
        _gap_table(page, gaps(results, attack, size), order)


def _gap_table(page: Page, rows: list[Gap], order: ModelOrder) -> None:
    page.para("Adaptive minus non-adaptive ASR, paired on the same images and trained "
              "models, with its 95 % interval (over several replicates: bootstrap and "
              "Student-t both); an interval above 0 means the non-adaptive number overstates the defence.")  # fmt: skip
    body = []
    for row in sorted(rows, key=lambda r: (r.model.defense, order(base_name(r.model)))):
        diff = row.difference()
        gap = "n/a" if diff is None else (
            f"{100 * diff[0]:+.1f} pp [{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}]")  # fmt: skip
        if row.same_cells:
            gap = "none by construction (forward-only: the same cells)"
        if diff is not None and diff[2] < 0:
            gap += ' <span class="flag">adaptive weaker: check the attack</span>'
        strongest = row.adaptive or row.non_adaptive
        body.append([row.model.name, row.source, _fmt(row.non_adaptive), _fmt(row.adaptive),
                     gap, _fmt(robust_accuracy(strongest)),
                     VIA.get(row.via, "none: no gradients (ORT)")])  # fmt: skip
    page.table(["defended target", "non-adaptive source", "non-adaptive ASR", "adaptive ASR",
                "gap", "robust accuracy", "adaptive attack"], body)  # fmt: skip
    page.para("Robust accuracy: the share of all evaluation images still classified "
              "correctly under the adaptive attack (the non-adaptive one where there is none), "
              "images wrong when clean included; ASR counts only those right when clean, so "
              "a defence that costs clean accuracy is scored on fewer images.")  # fmt: skip


def robust_accuracy(rate: SeedRate | None) -> SeedRate | None:
    """The unconditional robust accuracy of the cells behind ``rate``, pooled the same way
    (None when they were written without it)."""
    if rate is None or not rate.cells or any(c.robust_accuracy is None for c in rate.cells):
        return None
    return pool(c.model_copy(update=c.robust_accuracy.model_dump()) for c in rate.cells)


def _fmt(rate: SeedRate | None) -> str:
    return rate.fmt() if rate is not None else "n/a"
