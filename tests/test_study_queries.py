"""Query-only attacks in a study: crafted on the deployed ONNX Runtime model itself (and on
PyTorch models), recorded as 'query-only' with their query counts, and set beside the
gradient attacks in the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantpatch.errors import ConfigError
from quantpatch.metrics import Rate
from quantpatch.report import build_report
from quantpatch.report.queries import QueryRow
from quantpatch.report.tables import SeedRate
from quantpatch.results import load_results
from quantpatch.study import load_study, run_study

QUERIES = 60
SETTINGS = {
    "name": "queries",
    "limit": 800,
    "n_eval": 60,
    "models": ["lenet"],
    "precisions": ["fp32", "w8a8"],
    "controls": False,
    "attacks": [
        {"name": "sparse-rs", "params": {"queries": QUERIES}, "sources": ["w8a8", "ort-int8"]},
        {"name": "patch-pgd", "params": {"steps": 10}, "sources": ["fp32", "w8a8"]},
    ],
    "patch_sizes": [8],
    "train": {"epochs": 2, "lr": 0.05, "batch_size": 64},
    "qat": {"epochs": 1, "lr": 0.01},
    "qat_overrides": {},
    "analyses": {"gradient_alignment": False, "features": False, "spatial": False,
                 "size_curve": False, "quant_strength": False},
    "device": "cpu",
}  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("queries")
    config = load_study(None, **SETTINGS, cache_dir=root / "cache")
    run_study(config, root / "run", progress=False)
    build_report(root / "run")
    return root / "run"


def test_query_attack_runs_on_the_deployed_int8_model(run: Path) -> None:
    cells = load_results(run).cells
    own = {c.target: c for c in cells if c.threat == "query-only"}
    assert set(own) == {"lenet/w8a8", "lenet/ort-int8"}
    for cell in own.values():
        assert cell.source == cell.target and cell.threat == "query-only"
        assert cell.mean_queries is not None and 1 <= cell.mean_queries <= QUERIES
        assert cell.rate > 0
    # images crafted on the ORT session are also scored (as transfer) on the PyTorch models
    moved = [c for c in cells if c.source == "lenet/ort-int8" and c.target != c.source]
    assert {c.threat for c in moved} == {"transfer"} and len(moved) == 3
    gradient = [c for c in cells if c.attack == "patch-pgd"]
    assert {c.threat for c in gradient} == {"white-box", "transfer"}
    assert all(c.mean_queries is None for c in gradient)


def test_report_sets_query_only_beside_gradient_attacks(run: Path) -> None:
    html = (run / "report.html").read_text()
    section = html[html.index("Query-only vs gradient attacks") :]
    assert "lenet/ort-int8" in section and "lenet/w8a8" in section
    assert "patch-pgd" in section  # the best white-box / fp32-transfer gradient attack


def test_gradient_attacks_cannot_be_crafted_on_the_runtime() -> None:
    bad = {**SETTINGS, "attacks": [{"name": "patch-pgd", "sources": ["ort-int8"]}]}
    with pytest.raises(ConfigError, match="query attacks"):
        load_study(None, **bad)


def _rate(successes: int, n: int = 100) -> SeedRate:
    return SeedRate(rate=successes / n, n=n, spread=0.0, per_seed=(Rate(successes, n),))


@pytest.mark.parametrize(("query", "white", "flagged"), [(90, 50, True), (60, 50, False)])
def test_masking_flag_needs_separated_intervals(query: int, white: int, flagged: bool) -> None:
    row = QueryRow("lenet/w2a2", 8, "sparse-rs", _rate(query), 40.0,
                   ("patch-pgd", _rate(white)), None)  # fmt: skip
    assert row.masking is flagged
