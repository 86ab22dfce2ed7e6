"""The report reads results only: ``build_report(run_dir)`` renders report.html and figures/."""

from quantpatch.report.html import build_report, load_results

__all__ = ["build_report", "load_results"]
