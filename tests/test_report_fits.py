"""The report's fit-curve section: curves from the cell records, plateaus, threat models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantpatch.metrics import Rate
from quantpatch.report import build_report
from quantpatch.report.fits import fit_curves, plateau_step
from quantpatch.report.tables import ModelOrder
from quantpatch.results import (
    CellRecord,
    CurvePoint,
    ModelRecord,
    RateRecord,
    ResultsFile,
    Timings,
)

PRECISIONS = {"fp32": (None, None), "w2a2": (2, 2)}


def _model(precision: str) -> ModelRecord:
    bits, act = PRECISIONS[precision]
    return ModelRecord(name=f"lenet/{precision}", arch="lenet", precision=precision,
                       runtime="torch", weight_bits=bits, weight_levels=None, act_bits=act,
                       key="k", clean=RateRecord.of(Rate(95, 100)))  # fmt: skip


def _curve(successes: list[float], every: int = 10) -> list[CurvePoint]:
    return [CurvePoint(step=every * (i + 1), loss=1.0 + v, success=v)
            for i, v in enumerate(successes)]  # fmt: skip


def _cell(source: str, target: str, attack: str = "universal", seed: int = 0, successes=None,
          location=None, hits: int = 30) -> CellRecord:  # fmt: skip
    return CellRecord(
        **RateRecord.of(Rate(hits, 100)).model_dump(),
        study="s", dataset="d", cell=f"{source}-{attack}-{seed}", source=f"lenet/{source}",
        source_arch="lenet", source_precision=source, target=f"lenet/{target}",
        target_arch="lenet", target_precision=target,
        threat="white-box" if source == target else "transfer", attack=attack,
        attack_name=attack.partition("-")[0], attack_kind="patch", targeted=False,
        target_class=None, patch_size=7, patch_area=0.06, seed=seed,
        target_clean_accuracy=0.95, timings=Timings(fit_s=1.0, perturb_s=0.1, eval_s=0.1),
        fit_curve=None if successes is None else _curve(successes), patch_location=location,
    )  # fmt: skip


def test_plateau_is_the_first_step_at_95_percent_of_the_final_success() -> None:
    assert plateau_step([10, 20, 30, 40], [0.1, 0.5, 0.58, 0.6]) == 30  # 0.57 needed
    assert plateau_step([10, 20, 30], [0.6, 0.2, 0.6]) == 10
    assert plateau_step([10, 20], [0.0, 0.0]) == 10
    with pytest.raises(ValueError):
        plateau_step([], [])


def test_curves_count_each_cell_once_and_average_seeds() -> None:
    cells = [
        _cell(s, t, seed=seed, successes=[0.1 + seed * 0.2, 0.5 + seed * 0.2])
        for s in ("w2a2", "fp32") for t in ("fp32", "w2a2") for seed in (0, 1)
    ]  # fmt: skip
    cells.append(_cell("none", "fp32", attack="random"))  # no curve: no line
    curves = fit_curves(cells, ModelOrder([_model("fp32"), _model("w2a2")]))
    assert list(curves) == [("universal", 7)]
    fp32, w2a2 = curves[("universal", 7)]  # model order, not record order
    assert (fp32.source, w2a2.source, fp32.seeds) == ("lenet/fp32", "lenet/w2a2", 2)
    assert fp32.steps == [10, 20] and fp32.success == pytest.approx([0.2, 0.6])
    assert fp32.plateau == 20 and fp32.final == pytest.approx(0.6)


def test_report_shows_fit_curves_plateaus_and_both_threat_models(tmp_path: Path) -> None:
    flat = [0.1, 0.5, 0.6, 0.6, 0.61, 0.6, 0.6, 0.6, 0.6, 0.6]  # plateau by step 30 of 100
    cells = [_cell(s, t, successes=flat) for s in PRECISIONS for t in PRECISIONS]
    cells += [_cell(s, t, attack="lavan-universal-locationsearch", successes=flat,
                    location=(10, 10), hits=57) for s in PRECISIONS for t in PRECISIONS]  # fmt: skip
    results = ResultsFile(study="s", dataset="d", config={}, versions={}, device="cpu",
                          models=[_model(p) for p in PRECISIONS], cells=cells)  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(results.model_dump(mode="json")))
    html = build_report(tmp_path).read_text()
    assert "Fit curves" in html and (tmp_path / "figures" / "fit_curve_universal_7.png").exists()
    assert "by step 30 of 100" in html and "flat for the last 70% of the budget" in html
    assert "Placement threat models" in html and "best fixed location" in html
    assert "57.0%" in html and "(10, 10)" in html


def test_results_without_curves_have_no_fit_section(tmp_path: Path) -> None:
    results = ResultsFile(study="s", dataset="d", config={}, versions={}, device="cpu",
                          models=[_model("fp32")], cells=[_cell("fp32", "fp32")])  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(results.model_dump(mode="json")))
    assert "Fit curves" not in build_report(tmp_path).read_text()
