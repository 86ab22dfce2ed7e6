"""The results contract: one typed source for results.json, results.csv and the report."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from quantpatch.errors import CorruptFileError
from quantpatch.metrics import Rate
from quantpatch.results import (
    FORMAT_VERSION,
    JSON_ONLY,
    CellRecord,
    CurvePoint,
    RateRecord,
    ResultsFile,
    Timings,
    cells_to_csv,
    csv_columns,
    load_results,
    precision_order,
)


def _cell(**overrides) -> CellRecord:
    fields = {
        **RateRecord.of(Rate(3, 10)).model_dump(),
        "study": "s", "dataset": "d", "cell": "c", "source": "lenet/fp32",
        "source_arch": "lenet", "source_precision": "fp32", "target": "lenet/w4a4",
        "target_arch": "lenet", "target_precision": "w4a4", "threat": "transfer",
        "attack": "universal", "attack_name": "universal", "attack_kind": "patch",
        "targeted": False, "target_class": None, "patch_size": 7, "patch_area": 0.06,
        "seed": 0, "target_clean_accuracy": 0.9,
        "timings": Timings(fit_s=1.0, perturb_s=0.5, eval_s=0.1),
    }  # fmt: skip
    return CellRecord(**{**fields, **overrides})


def test_csv_columns_come_from_the_record() -> None:
    columns = csv_columns()
    for name in CellRecord.model_fields:
        if name not in ("timings", *JSON_ONLY):
            assert name in columns
    assert {"fit_s", "perturb_s", "eval_s"} <= set(columns)
    rows = list(csv.DictReader(io.StringIO(cells_to_csv([_cell(), _cell(seed=1)]))))
    assert len(rows) == 2 and rows[1]["seed"] == "1" and rows[0]["fit_s"] == "1.0"
    assert list(rows[0]) == columns


CURVE = [CurvePoint(step=5, loss=1.0, success=0.2), CurvePoint(step=10, loss=2.5, success=0.5)]


def test_fit_curves_are_json_only_and_optional(tmp_path: Path) -> None:
    fitted = _cell(fit_curve=CURVE, patch_location=(10, 3))
    assert not set(JSON_ONLY) & set(csv_columns())
    assert cells_to_csv([fitted]) == cells_to_csv([_cell()])  # the CSV is unchanged
    path = _results_file(tmp_path, cells=[fitted.model_dump(mode="json")])
    loaded = load_results(path).cells[0]
    assert loaded == fitted and loaded.fit_curve[1].success == 0.5
    old = json.loads(path.read_text())  # results written before curves existed
    for field in JSON_ONLY:
        del old["cells"][0][field]
    path.write_text(json.dumps(old))
    assert load_results(path).cells[0].fit_curve is None
    with pytest.raises(ValidationError):
        CurvePoint(step=0, loss=1.0, success=0.5)
    with pytest.raises(ValidationError):
        CurvePoint(step=1, loss=1.0, success=1.5)


@pytest.mark.parametrize(
    "bad",
    [{"successes": 11, "n": 10, "rate": 1.1}, {"successes": -1}, {"rate": 0.9}, {"stepz": 1}],
)
def test_impossible_or_unknown_fields_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        _cell(**bad)


def _results_file(tmp_path: Path, **overrides) -> Path:
    data = ResultsFile(
        study="s", dataset="d", config={}, versions={}, device="cpu", models=[], cells=[_cell()]
    ).model_dump(mode="json")
    data.update(overrides)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_results_round_trip(tmp_path: Path) -> None:
    results = load_results(_results_file(tmp_path))
    assert results.format_version == FORMAT_VERSION
    assert results.cells[0] == _cell()


@pytest.mark.parametrize(
    "overrides", [{"format_version": 1}, {"cells": [{"rate": 0.5}]}, {"models": "x"}]
)
def test_wrong_version_or_shape_is_a_corrupt_file(tmp_path: Path, overrides: dict) -> None:
    with pytest.raises(CorruptFileError):
        load_results(_results_file(tmp_path, **overrides))


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m for m in out.stdout.split() if m.startswith("quantpatch")}


def test_report_reads_results_without_the_study_stack() -> None:
    loaded = _imported_after("import quantpatch.report")
    for package in ("study", "attacks", "models", "data", "quant", "analysis"):
        assert not any(m.startswith(f"quantpatch.{package}") for m in loaded), package


def test_precision_order_is_weight_bits_then_activation_bits() -> None:
    """The one "lowest precision" rule: w2a8 is below w4a4 (a sum of bits would tie-break
    the other way), and float counts as 32 bits."""
    from quantpatch.quant import QuantSpec
    from quantpatch.study.settings.names import lowest_precision

    specs = [QuantSpec.parse(p) for p in ("fp32", "w4a4", "w2a8", "w8a8")]
    assert lowest_precision(specs).name == "w2a8"
    assert precision_order(None, None) == (32, 32)
    assert sorted(specs, key=lambda s: precision_order(s.weight_bits, s.act_bits))[0].name == "w2a8"


def test_study_never_imports_the_report() -> None:
    loaded = _imported_after("import quantpatch.study")
    assert not any(m.startswith("quantpatch.report") for m in loaded)


def test_older_formats_are_refused(tmp_path: Path) -> None:
    """Format 5 made certificates and deployments generic; a format-4 file is refused in one
    line that says what to do, never misread."""
    path = _results_file(tmp_path, format_version=4)
    with pytest.raises(CorruptFileError, match="rerun the study"):
        load_results(path)
