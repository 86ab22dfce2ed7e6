"""The report's figures from results, for a notebook or a script.

Each function takes a ``ResultsFile`` (``quantpatch.results.load_results``) or a run folder
and returns a matplotlib ``Figure``, drawn exactly as in ``report.html`` (same pooling over
seeds and trained replicates, same intervals)::

    from quantpatch.report import plots
    plots.transfer("runs/demo", "universal", 7).savefig("transfer.png")
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from quantpatch.errors import ConfigError
from quantpatch.report import figures
from quantpatch.report.compare import compare_runs, comparison_figure
from quantpatch.report.html import first_replicates, undefended
from quantpatch.report.tables import ModelOrder, attack_sizes, clean_by_model
from quantpatch.results import ResultsFile, load_results

Results = ResultsFile | str | Path


def _load(results: Results) -> ResultsFile:
    return results if isinstance(results, ResultsFile) else load_results(results)


def clean_accuracy(results: Results) -> Figure:
    """Clean accuracy of every model (mean over its trained replicates), per architecture."""
    loaded = _load(results)
    models = undefended(first_replicates(loaded)).models
    order = ModelOrder(loaded.models)
    return figures.clean_accuracy_figure(sorted(models, key=lambda m: order(m.name)), order,
                                         clean_by_model(loaded.models))  # fmt: skip


def transfer(results: Results, attack: str, patch_size: int | None = None) -> Figure:
    """Source x target ASR of one attack (the diagonal outlined: white-box)."""
    loaded = undefended(_load(results))
    _check_attack(loaded, attack, patch_size)
    return figures.transfer_heatmap(loaded.cells, attack, patch_size, ModelOrder(loaded.models))


def asr_vs_precision(results: Results, attack: str, patch_size: int | None = None) -> Figure:
    """ASR against weight bits: on the target itself, from fp32, and a random patch."""
    loaded = undefended(_load(results))
    _check_attack(loaded, attack, patch_size)
    models = first_replicates(loaded).models
    fig = figures.asr_vs_bits_figure(loaded.cells, models, attack, patch_size,
                                     ModelOrder(loaded.models))  # fmt: skip
    if fig is None:
        raise ConfigError(f"'{attack}' has no white-box or fp32-transfer cell to plot")
    return fig


def compare(run_dirs: list[str | Path]) -> Figure:
    """The rates that differ most across runs, each with its 95 % interval."""
    return comparison_figure(compare_runs(run_dirs))


def _check_attack(results: ResultsFile, attack: str, patch_size: int | None) -> None:
    known = attack_sizes(results.cells)
    if (attack, patch_size) not in known:
        listed = ", ".join(f"{a} {s}" if s else a for a, s in known)
        raise ConfigError(f"no cells of attack '{attack}' at patch size {patch_size}; "
                          f"the results hold: {listed}")  # fmt: skip
