"""A smoke study on the embedded MNIST digits through the Python API, then the report's
figures drawn from its results (a notebook does the same, cell by cell).

    python examples/quick_study.py [OUT]      # default runs/example; a few minutes on 2 cores

``--quick`` settings (1 replicate, 100 images, 1 epoch, 10 attack steps, no analyses): the
figures show the pipeline, not findings. Run it twice with another ``seed`` and compare the
runs with ``quantpatch compare``."""

from __future__ import annotations

import sys
from pathlib import Path

from quantpatch.report import build_report, plots
from quantpatch.results import load_results
from quantpatch.study import Shortcuts, load_study, run_study


def main(out: Path) -> None:
    config = load_study(None, models=["lenet"], precisions=["fp32", "w8a8-ptq", "w2a2"],
                        shortcuts=Shortcuts.of(quick=True))  # fmt: skip
    run_study(config, out)
    print(f"report: {build_report(out)}")
    results = load_results(out)
    figures = out / "plots"
    figures.mkdir(exist_ok=True)
    plots.clean_accuracy(results).savefig(figures / "clean_accuracy.png", bbox_inches="tight")
    size = config.patch_sizes[0]
    for attack in ("universal", "patch-pgd"):
        plots.transfer(results, attack, size).savefig(figures / f"transfer_{attack}.png",
                                                       bbox_inches="tight")  # fmt: skip
    plots.asr_vs_precision(results, "patch-pgd", size).savefig(figures / "asr_vs_precision.png",
                                                               bbox_inches="tight")  # fmt: skip
    print(f"figures: {figures}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/example"))
