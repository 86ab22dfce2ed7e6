"""The report reads results only: ``build_report(run_dir)`` renders report.html and figures/.

It depends on the results contract (``quantpatch.results``), the metrics and matplotlib, never
on the study that produced the results."""

from quantpatch.report.html import build_report

__all__ = ["build_report"]
