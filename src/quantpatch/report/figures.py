"""Paper-ready matplotlib figures built from result records (Agg backend, no display)."""

from __future__ import annotations

import re

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
from quantpatch.results import CellRecord, ModelRecord  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False})  # fmt: skip


def _errorbar(ax, xs, cells: list[SeedRate | None], label: str, **kwargs) -> None:
    points = [(x, c) for x, c in zip(xs, cells, strict=True) if c is not None]
    if not points:
        return
    x = [p[0] for p in points]
    y = np.array([100 * c.rate for _, c in points])
    low = np.array([100 * c.ci[0] for _, c in points])
    high = np.array([100 * c.ci[1] for _, c in points])
    ax.errorbar(x, y, yerr=[y - low, high - y], capsize=3, marker="o", label=label, **kwargs)


def clean_accuracy_figure(models: list[ModelRecord], order: ModelOrder) -> Figure:
    """Clean accuracy per precision for each architecture, with Wilson intervals."""
    archs = sorted({m.arch for m in models})
    by_precision = {m.precision: order(m.name)[1:] for m in models}
    precisions = sorted(by_precision, key=lambda p: by_precision[p])
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 + 1.1 * len(precisions)), 3.4))
    width = 0.8 / max(1, len(archs))
    for i, arch in enumerate(archs):
        rows = {m.precision: m.clean for m in models if m.arch == arch}
        xs = [j + i * width for j, p in enumerate(precisions) if p in rows]
        rates = [rows[p] for p in precisions if p in rows]
        y = np.array([100 * r.rate for r in rates])
        err = [y - [100 * r.ci_low for r in rates], [100 * r.ci_high for r in rates] - y]
        ax.bar(xs, y, width, yerr=err, capsize=2, label=arch)
    ax.set_xticks([j + width * (len(archs) - 1) / 2 for j in range(len(precisions))])
    ax.set_xticklabels(precisions)
    ax.set_ylim(0, 100)  # from 0: a truncated axis makes a 2-point gap look like a collapse
    ax.set_ylabel("clean accuracy (%)")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the bars
    fig.tight_layout()
    return fig


def asr_vs_bits_figure(
    records: list[CellRecord], attack: str, size: int | None, order: ModelOrder
) -> Figure:
    """ASR on the target itself (white-box, or query-only for a query attack) and fp32 ->
    target transfer per precision, one panel per architecture. The axis holds the trained
    precisions only, fewest bits last; fp32-ft controls and integer runtimes are in the
    transfer tables, where they are not mistaken for points on a bit-width scale."""
    chosen = [r for r in records if r.attack == attack and r.patch_size == size
              and PRECISION_NAME.match(r.target_precision)]  # fmt: skip
    baseline = [r for r in records if r.attack == "random" and r.patch_size == size]
    archs = sorted({r.target_arch for r in chosen})
    fig, axes = plt.subplots(1, len(archs), figsize=(4.8 * len(archs), 3.4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        rows = [r for r in chosen if r.target_arch == arch]
        targets = sorted({r.target for r in rows}, key=order)
        xs = list(range(len(targets)))
        by_target = group(rows, "target", "source")
        own = [pool(by_target.get((t, t), [])) for t in targets]
        fp32 = [pool(by_target.get((t, f"{arch}/fp32"), [])) for t in targets]
        noise = group(baseline, "target")
        random = [pool(noise.get((t,), [])) for t in targets]
        threats = {r.threat for t in targets for r in by_target.get((t, t), [])}
        _errorbar(ax, xs, own, " / ".join(sorted(threats)) or "white-box")
        _errorbar(ax, xs, fp32, f"{arch}/fp32 → target", linestyle="--")
        if attack != "random":
            _errorbar(ax, xs, random, "random patch (baseline)", linestyle=":", color="gray")
        ax.set_xticks(xs)
        ax.set_xticklabels([t.partition("/")[2] for t in targets])
        ax.set_ylim(0, 100)
        ax.set_title(f"{arch}: {attack}" + (f", {size}px" if size else ""))
        ax.set_ylabel("ASR (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, frameon=False, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.0)
    )  # below the panels: never over an error bar
    fig.tight_layout()
    return fig


PRECISION_NAME = re.compile(r"^(fp32|w\d+a\d+(-ptq)?)$")
"""A trained precision's name (fp32, w4a4, w8a8-ptq), not a control or a runtime."""


def transfer_heatmap(
    records: list[CellRecord], attack: str, size: int | None, order: ModelOrder
) -> Figure:
    """Source x target ASR matrix; white-box cells on the diagonal are outlined."""
    sources, targets, _ = transfer_matrix(records, attack, size, order)
    fig, ax = plt.subplots(figsize=(1.6 + 0.62 * len(targets), max(2.6, 1.4 + 0.42 * len(sources))))
    _draw_transfer(fig, ax, records, attack, size, order)
    fig.tight_layout()
    return fig


def side_by_side(
    records: list[CellRecord], panels: list[tuple[str, int | None]], order: ModelOrder
) -> Figure:
    """Several transfer matrices in one row (e.g. a patch attack next to pixel PGD)."""
    shapes = [transfer_matrix(records, a, s, order)[:2] for a, s in panels]
    width = sum(1.6 + 0.62 * len(targets) for _, targets in shapes)
    height = max(max(2.6, 1.4 + 0.42 * len(sources)) for sources, _ in shapes)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
    for ax, (attack, size) in zip(axes[0], panels, strict=True):
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
                ax.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color=color)  # fmt: skip
            if s == t:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5,
                                           edgecolor="cyan"))  # fmt: skip
    ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right")
    ax.set_yticks(range(len(sources)), sources)
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
        ax.plot(x, y, marker="o", label=label)
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
