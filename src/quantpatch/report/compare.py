"""The same cells across runs (other seeds, replicates, machines or commits), side by side.

A run is one ``results.json``. Each cell (source, target, attack, patch size) and each model's
clean accuracy is pooled over its seeds and trained replicates exactly as the report pools it,
and a later run's rate is marked where its 95 % interval and the first run's do not overlap:
a conservative test for independent runs (disjoint 95 % intervals imply a difference well
beyond the 5 % level), so an unmarked cell is "not shown to differ", not "the same"."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from quantpatch._io import write_text_atomic
from quantpatch.errors import ConfigError
from quantpatch.report.page import Page
from quantpatch.report.tables import SeedRate, clean_by_model, group, pool
from quantpatch.results import ResultsFile, load_results

MAX_FIGURE_ROWS = 30
"""The figure shows the rows whose rates spread most across runs (the table shows all)."""


@dataclass(frozen=True)
class ComparedRow:
    """One quantity (a cell's ASR, or a model's clean accuracy) in every run."""

    what: str
    rates: tuple[SeedRate, ...]

    @property
    def differs(self) -> tuple[bool, ...]:
        """Per later run: its interval and the first run's are disjoint."""
        low0, high0 = self.rates[0].ci
        return tuple(r.ci[0] > high0 or r.ci[1] < low0 for r in self.rates[1:])

    @property
    def spread(self) -> float:
        values = [r.rate for r in self.rates]
        return max(values) - min(values)


@dataclass(frozen=True)
class Comparison:
    runs: tuple[str, ...]
    rows: tuple[ComparedRow, ...]
    only_some: int
    """Cells and models present in some of the runs only (left out of ``rows``)."""


def compare_runs(run_dirs: list[str | Path]) -> Comparison:
    """Every cell and model present in all of ``run_dirs`` (at least two), first run first."""
    if len(run_dirs) < 2:
        raise ConfigError("compare needs at least two run folders")
    loaded = [load_results(Path(d)) for d in run_dirs]
    labels = _labels([Path(d) for d in run_dirs])
    per_run = [_quantities(results) for results in loaded]
    common = [key for key in per_run[0] if all(key in q for q in per_run[1:])]
    every = set().union(*per_run)
    rows = tuple(ComparedRow(key, tuple(q[key] for q in per_run)) for key in common)
    return Comparison(tuple(labels), rows, len(every) - len(common))


def _labels(paths: list[Path]) -> list[str]:
    """Each run's folder name, or its path where two names are the same."""
    names = [p.name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _quantities(results: ResultsFile) -> dict[str, SeedRate]:
    """Cell ASRs and clean accuracies of one run, pooled over seeds and replicates."""
    found: dict[str, SeedRate] = {}
    for name, clean in clean_by_model(results.models).items():
        found[f"clean accuracy · {name}"] = clean
    keys = ("attack", "patch_size", "source", "target")
    for (attack, size, source, target), records in group(results.cells, *keys).items():
        pooled = pool(records)
        if pooled is not None:
            where = f"{attack}{f' {size}px' if size else ''}"
            found[f"ASR · {where} · {source} → {target}"] = pooled
    return found


def comparison_rows(comparison: Comparison) -> list[list[str]]:
    """Table rows: the quantity, each run's rate (a later run marked * where it differs)."""
    rows = []
    for row in comparison.rows:
        cells = [row.rates[0].fmt()]
        cells += [
            r.fmt() + (" *" if d else "") for r, d in zip(row.rates[1:], row.differs, strict=True)
        ]
        rows.append([row.what, *cells])
    return rows


def comparison_figure(comparison: Comparison) -> Figure:
    """Each run's rate and 95 % interval for the rows that spread most across runs."""
    shown = sorted(comparison.rows, key=lambda r: -r.spread)[:MAX_FIGURE_ROWS]
    runs = len(comparison.runs)
    fig = Figure(figsize=(12, 1.2 + 0.32 * max(1, len(shown))), layout="constrained")
    ax = fig.subplots()
    offsets = np.linspace(-0.25, 0.25, runs) if runs > 1 else np.zeros(1)
    for k, (label, offset) in enumerate(zip(comparison.runs, offsets, strict=True)):
        ys = np.arange(len(shown)) + offset
        rates = np.array([100 * row.rates[k].rate for row in shown])
        lows = np.array([100 * row.rates[k].ci[0] for row in shown])
        highs = np.array([100 * row.rates[k].ci[1] for row in shown])
        ax.errorbar(rates, ys, xerr=[rates - lows, highs - rates], fmt="o", ms=4, capsize=2,
                    label=label)  # fmt: skip
    ax.set_yticks(range(len(shown)), [row.what for row in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("rate (%), 95 % interval")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(runs, 4), frameon=False)
    return fig


def write_comparison(comparison: Comparison, out: str | Path) -> Path:
    """A self-contained HTML page: the table of every common row and the figure."""
    out = Path(out)
    page = Page(out.parent / f"{out.stem}_figures")
    page.heading(f"quantpatch: {len(comparison.runs)} runs compared", 1)
    page.para(
        f"Runs: {', '.join(comparison.runs)}. Every rate is pooled over its seeds and trained "
        "replicates as in each run's report (n = images per seed; interval over models and "
        "images where a run has several replicates). * marks a rate whose 95 % interval and "
        "the first run's do not overlap. "
        f"{comparison.only_some} cells or models present in only some runs are left out."
    )
    page.toc_here()
    if not comparison.rows:
        page.heading("Nothing in common")
        page.para("No cell or model is present in every run.")
    else:
        page.heading("Rates across runs")
        page.figure(comparison_figure(comparison), "compare",
                    f"The {min(len(comparison.rows), MAX_FIGURE_ROWS)} rows that differ most "
                    "across runs; bars: 95 % intervals.")  # fmt: skip
        rows = comparison_rows(comparison)
        marked = {(i, j + 2) for i, row in enumerate(comparison.rows)
                  for j, differs in enumerate(row.differs) if differs}  # fmt: skip
        page.table(["quantity", *comparison.runs], [[html.escape(c) for c in r] for r in rows],
                   marked)  # fmt: skip
    write_text_atomic(out, page.render("quantpatch compare"))
    return out
