"""Paper-ready matplotlib figures built from result records (Agg backend, no display)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from quantpatch.report.tables import (  # noqa: E402
    ModelOrder,
    SeedRate,
    group,
    pool,
    transfer_matrix,
)
from quantpatch.results import INDEPENDENT_FP32, CellRecord, ModelRecord  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False})  # fmt: skip


LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)))
MARKERS = ("o", "s", "D", "^", "v", "x", "+")
"""Cycled per series, so series that coincide (lenet fp32 and w8a8-ptq) stay told apart."""


def _tick(name: str) -> str:
    """A model name on two lines (architecture over precision): readable unrotated."""
    return name.replace("/", "\n", 1)


def clean_accuracy_figure(
    models: list[ModelRecord], order: ModelOrder, clean: dict[str, SeedRate]
) -> Figure:
    """Clean accuracy per precision for each architecture (``clean``: by model name, over
    its trained replicates), with 95 % intervals."""
    archs = sorted({m.arch for m in models})
    by_precision = {m.precision: order(m.name)[1:] for m in models}
    precisions = sorted(by_precision, key=lambda p: by_precision[p])
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 + 1.1 * len(precisions)), 3.4))
    width = 0.8 / max(1, len(archs))
    for i, arch in enumerate(archs):
        rows = {m.precision: clean[m.name] for m in models if m.arch == arch}
        xs = [j + i * width for j, p in enumerate(precisions) if p in rows]
        rates = [rows[p] for p in precisions if p in rows]
        y = np.array([100 * r.rate for r in rates])
        err = [y - [100 * r.ci[0] for r in rates], [100 * r.ci[1] for r in rates] - y]
        ax.bar(xs, y, width, yerr=err, capsize=2, label=arch)
    ax.set_xticks([j + width * (len(archs) - 1) / 2 for j in range(len(precisions))])
    ax.set_xticklabels(precisions)
    ax.set_ylim(0, 100)  # from 0: a truncated axis makes a 2-point gap look like a collapse
    ax.set_ylabel("clean accuracy (%)")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the bars
    fig.tight_layout()
    return fig


def asr_vs_bits_figure(
    records: list[CellRecord],
    models: list[ModelRecord],
    attack: str,
    size: int | None,
    order: ModelOrder,
) -> Figure | None:
    """ASR against weight bits (a log2 axis; float at 32), one panel per architecture: on the
    target itself (white-box, or query-only for a query attack), transferred from the fp32
    sibling, and a random patch of the same size. Trained precisions are joined by lines;
    fp32-ft controls and integer runtimes are separate markers at their bits, so a control is
    never read as a point on the bit-width scale. Recipe and defended models are left out
    (their own report sections hold them). None: no architecture has a point to show."""
    by_name = {m.name: m for m in models if m.defense is None and m.recipe is None}
    chosen = [r for r in records if r.attack == attack and r.patch_size == size
              and r.target in by_name]  # fmt: skip
    noise = group([r for r in records if r.attack == "random" and r.patch_size == size],
                  "target")  # fmt: skip
    # an architecture with neither white-box nor fp32-transfer cells (a user's ONNX model)
    # would show the baseline alone: it gets no panel
    archs = sorted({r.target_arch for r in chosen
                    if r.source in (r.target, f"{r.target_arch}/fp32")})  # fmt: skip
    if not archs:
        return None
    fig, axes = plt.subplots(1, len(archs), figsize=(6.4 * len(archs), 3.8), squeeze=False)
    threats: set[str] = set()
    for ax, arch in zip(axes[0], archs, strict=True):
        by_pair = group([r for r in chosen if r.target_arch == arch], "target", "source")
        targets = sorted({t for t, _ in by_pair}, key=order)
        threats |= {r.threat for t in targets for r in by_pair.get((t, t), [])}
        x = _bit_positions([by_name[t] for t in targets])
        rates = {
            "own": [pool(by_pair.get((t, t), [])) for t in targets],
            "fp32": [pool(by_pair.get((t, f"{arch}/fp32"), [])) for t in targets],
            "random": [pool(noise.get((t,), [])) if attack != "random" else None
                       for t in targets],
        }  # fmt: skip
        for (series, color), shift in zip(SERIES_COLORS.items(), (-0.05, 0.0, 0.05), strict=True):
            _bit_series(ax, targets, by_name, [p + shift for p in x], rates[series], color)
        for t, position, cell in zip(targets, x, rates["own"], strict=True):
            if cell is not None:
                ax.annotate(t.partition("/")[2], (position - 0.05, 100 * cell.rate), fontsize=7,
                            xytext=(3, 4), textcoords="offset points")  # fmt: skip
        bits = sorted({by_name[t].weight_bits or 32 for t in targets})
        ax.set_xticks([math.log2(b) for b in bits], [str(b) if b < 32 else "32 (float)"
                                                     for b in bits])  # fmt: skip
        ax.set_xlabel("weight bits")
        ax.set_ylim(0, 105)
        ax.set_title(f"{arch}: {attack}" + (f", {size}px" if size else ""))
        ax.set_ylabel("ASR (%)")
    drawn = {series for series, color in SERIES_COLORS.items()
             if any(line.get_color() == color for ax in axes[0] for line in ax.lines)}  # fmt: skip
    kinds = {_model_kind(by_name[r.target]) for r in chosen if r.target_arch in archs}
    fig.legend(handles=_bit_legend(" / ".join(sorted(threats)) or "white-box", drawn, kinds),
               frameon=False,
               loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.0))  # fmt: skip
    fig.tight_layout()
    return fig


SERIES_COLORS = {"own": "C0", "fp32": "C1", "random": "gray"}
KIND_MARKERS = {"trained": "o", "control": "s", "independent": "D", "runtime": "^"}


def _model_kind(model: ModelRecord) -> str:
    """How a model is drawn: a precision on the line, or a marker beside it."""
    if model.runtime != "torch":
        return "runtime"
    if model.precision == INDEPENDENT_FP32:
        return "independent"
    return "control" if model.control_of else "trained"


def _bit_positions(models: list[ModelRecord]) -> list[float]:
    """log2 of each model's weight bits, nudged apart where several share them (w8a8 and
    w8a8-ptq, or fp32 and its controls), in the given order."""
    seen: dict[int, int] = {}
    positions = []
    for m in models:
        bits = m.weight_bits or 32
        positions.append(math.log2(bits) + 0.3 * seen.get(bits, 0))
        seen[bits] = seen.get(bits, 0) + 1
    return positions


def _bit_series(ax, targets, by_name, xs, cells, color: str) -> None:
    """One series: error bars for every model, a line through the trained precisions."""
    line_x, line_y = [], []
    for target, x, cell in zip(targets, xs, cells, strict=True):
        if cell is None:
            continue
        kind = _model_kind(by_name[target])
        y, (low, high) = 100 * cell.rate, (100 * cell.ci[0], 100 * cell.ci[1])
        ax.errorbar([x], [y], yerr=[[y - low], [high - y]], color=color, capsize=3,
                    marker=KIND_MARKERS[kind], mfc=color if kind == "trained" else "white",
                    linestyle="none")  # fmt: skip
        if kind == "trained":
            line_x.append(x)
            line_y.append(y)
    if line_x:
        ranked = sorted(zip(line_x, line_y, strict=True))
        ax.plot(*zip(*ranked, strict=True), color=color, linewidth=1,
                linestyle="--" if color != "C0" else "-")  # fmt: skip


def _bit_legend(own_label: str, drawn: set[str], drawn_kinds: set[str]) -> list:
    from matplotlib.lines import Line2D

    labels = {"own": f"on the target ({own_label})", "fp32": "transfer from fp32",
              "random": "random patch (baseline)"}  # fmt: skip
    handles = [Line2D([], [], color=c, label=labels[s]) for s, c in SERIES_COLORS.items()
               if s in drawn]  # fmt: skip
    kinds = {"trained": "trained precision", "control": "fp32-ft control (at 32)",
             "independent": "fp32 from another seed (at 32)",
             "runtime": "integer runtime (at its bits)"}  # fmt: skip
    handles += [Line2D([], [], color="black", marker=m, linestyle="none", label=kinds[k],
                       mfc="black" if k == "trained" else "white")
                for k, m in KIND_MARKERS.items() if k in drawn_kinds]  # fmt: skip
    return handles


MAX_ROW_IN = 16.0
"""Widest figure (inches) the report puts panels side by side in; beyond it they stack."""

CELL_IN = 0.95
"""Inches per heatmap column: room for an unrotated two-line label such as resnet20/fp32-ft."""


def transfer_heatmap(
    records: list[CellRecord], attack: str, size: int | None, order: ModelOrder
) -> Figure:
    """Source x target ASR matrix; white-box cells on the diagonal are outlined."""
    sources, targets, _ = transfer_matrix(records, attack, size, order)
    fig, ax = plt.subplots(
        figsize=(2.4 + CELL_IN * len(targets), max(2.8, 1.6 + 0.45 * len(sources)))
    )
    _draw_transfer(fig, ax, records, attack, size, order)
    fig.tight_layout()
    return fig


def side_by_side(
    records: list[CellRecord], panels: list[tuple[str, int | None]], order: ModelOrder
) -> Figure:
    """Several transfer matrices in one row (e.g. a patch attack next to pixel PGD)."""
    shapes = [transfer_matrix(records, a, s, order)[:2] for a, s in panels]
    widths = [2.4 + CELL_IN * len(targets) for _, targets in shapes]
    heights = [max(2.8, 1.6 + 0.45 * len(sources)) for sources, _ in shapes]
    if sum(widths) <= MAX_ROW_IN:  # side by side
        fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), max(heights)),
                                 squeeze=False)  # fmt: skip
    else:  # stacked: a page is not wide enough for several wide matrices
        fig, axes = plt.subplots(len(panels), 1, figsize=(max(widths), sum(heights)),
                                 squeeze=False)  # fmt: skip
    for ax, (attack, size) in zip(axes.flat, panels, strict=True):
        _draw_transfer(fig, ax, records, attack, size, order)
    fig.tight_layout()
    return fig


def _draw_transfer(
    fig: Figure, ax, records: list[CellRecord], attack: str, size: int | None, order: ModelOrder
) -> None:
    sources, targets, cells = transfer_matrix(records, attack, size, order)
    matrix = np.full((len(sources), len(targets)), np.nan)
    for (s, t), cell in cells.items():
        matrix[sources.index(s), targets.index(t)] = 100 * cell.rate
    image = ax.imshow(matrix, vmin=0, vmax=100, cmap="magma", aspect="auto")
    for i, s in enumerate(sources):
        for j, t in enumerate(targets):
            if not np.isnan(matrix[i, j]):
                color = "black" if matrix[i, j] > 60 else "white"
                ax.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color=color)  # fmt: skip
            if s == t:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5,
                                           edgecolor="cyan"))  # fmt: skip
    ax.set_xticks(range(len(targets)), [_tick(t) for t in targets], fontsize=8)
    ax.set_yticks(range(len(sources)), sources, fontsize=8)
    ax.set_xlabel("target")
    ax.set_ylabel("source (patch crafted on)")
    ax.set_title(f"{attack}" + (f", {size}px" if size else "") + ": ASR (%)")
    fig.colorbar(image, ax=ax, fraction=0.04)


def heatmap_grid(
    maps: dict[str, np.ndarray], title: str, order: ModelOrder, vmax: float = 100
) -> Figure:
    """Small multiples of 2-D maps (e.g. ASR by patch location), one per model."""
    names = sorted(maps, key=order)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        image = ax.imshow(maps[name], vmin=0, vmax=vmax, cmap="viridis")
        ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03)
    return fig


def line_figure(
    series: dict[str, list[tuple[float, float, float, float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    xticklabels: list[str] | None = None,
) -> Figure:
    """Lines with interval bands: each series is a list of (x, y, low, high)."""
    fig, ax = plt.subplots(figsize=(4.2, 3))
    for label, points in series.items():
        if not points:
            continue
        x, y, low, high = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        k = len(ax.lines)
        ax.plot(x, y, marker=MARKERS[k % len(MARKERS)], label=label,
                linestyle=LINE_STYLES[k % len(LINE_STYLES)])  # fmt: skip
        ax.fill_between(x, low, high, alpha=0.2)
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), xticklabels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig


def matrix_figure(labels: list[str], matrix: np.ndarray, title: str, fmt: str = "{:.2f}",
                  vmin: float = 0.0, vmax: float = 1.0) -> Figure:  # fmt: skip
    """A labelled square matrix (e.g. gradient cosine between precisions)."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(labels), 1.0 + 0.5 * len(labels)))
    image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="viridis")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if not np.isnan(matrix[i, j]):
                ax.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] < (vmin + vmax) / 2 else "black")  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig
