"""End-to-end: a tiny study runs every stage, writes valid results, and reruns from cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from quantpatch.errors import (
    ConfigError,
    InvalidSpecError,
    PatchTooLargeError,
    QuantpatchError,
    UnknownNameError,
)
from quantpatch.quant import QuantSpec
from quantpatch.report import build_report
from quantpatch.results import csv_columns, load_results
from quantpatch.study import load_study, run_study


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_study_settings) -> Path:
    root = tmp_path_factory.mktemp("study")
    config = load_study(None, **tiny_study_settings, cache_dir=root / "cache")
    run_study(config, root / "run", progress=False)
    build_report(root / "run")
    return root


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_results_match_schema_and_cover_the_grid(finished_run: Path) -> None:
    load_results(finished_run / "run")
    results = _results(finished_run / "run")
    targets = {m["name"] for m in results["models"]}
    torch_models = ("lenet/fp32", "lenet/fp32-ft", "lenet/w8a8", "lenet/w2a2")
    assert targets == {*torch_models, "lenet/ort-int8", "lenet/ort-w8a8"}
    universal = [c for c in results["cells"] if c["attack"] == "universal"]
    assert {(c["source"], c["target"]) for c in universal} == {
        (s, t) for s in torch_models for t in targets
    }
    for cell in results["cells"]:
        assert 0 <= cell["ci_low"] <= cell["rate"] <= cell["ci_high"] <= 1
        assert cell["n"] > 0
    # every target record of a cell carries its patch's fit curve: 40 steps, a point per 2
    curves = {c["cell"]: c["fit_curve"] for c in universal}
    assert len(curves) == len(torch_models) and len(universal) == len(torch_models) * len(targets)
    assert all(c["fit_curve"] == curves[c["cell"]] for c in universal)
    for curve in curves.values():
        assert [p["step"] for p in curve] == list(range(2, 41, 2))
    assert all(c["fit_curve"] is None for c in results["cells"] if c["attack"] == "random")


def test_fp32_control_gets_the_qat_schedule(finished_run: Path) -> None:
    """The control repeats the quantized models' extra training in float (one schedule here)."""
    models = {m["name"]: m for m in _results(finished_run / "run")["models"]}
    assert models["lenet/fp32-ft"]["control_of"] == ["lenet/w8a8", "lenet/w2a2"]
    assert models["lenet/fp32-ft"]["key"] != models["lenet/fp32"]["key"]
    assert models["lenet/w8a8"]["control_of"] == []


def test_trained_patch_beats_random_noise(finished_run: Path) -> None:
    cells = _results(finished_run / "run")["cells"]
    white = [c["rate"] for c in cells if c["attack"] == "universal" and c["threat"] == "white-box"]
    noise = [c["rate"] for c in cells if c["attack"] == "random"]
    assert min(white) > max(noise)


def test_quantized_models_stay_near_fp32(finished_run: Path) -> None:
    models = {m["name"]: m for m in _results(finished_run / "run")["models"]}
    fp32 = models["lenet/fp32"]["clean"]["rate"]
    assert fp32 > 0.85
    assert models["lenet/w8a8"]["clean"]["rate"] > fp32 - 0.02
    assert models["lenet/w2a2"]["clean"]["rate"] > fp32 - 0.08


def test_deployed_int8_models_match_their_simulations(finished_run: Path) -> None:
    """ORT int8 is predicted by its matched simulation better than by fp32 (the null), on clean
    adversarial and patch images (crafted on the simulation); the QAT model exported with its
    own scales agrees >= 99 %."""
    models = {m["name"]: m for m in _results(finished_run / "run")["models"]}
    ptq = models["lenet/ort-int8"]["deployment"]
    assert ptq["kind"] == "ptq" and "lenet/fp32" in ptq["reference"]
    assert ptq["patched_attack"].startswith("patch-pgd on the simulation")
    for check in (ptq["clean"], ptq["adversarial"], ptq["patched"]):
        assert check["simulation"]["agreement"]["rate"] >= 0.97
        assert check["simulation"]["logit_error"] < check["fp32"]["logit_error"]
        assert check["simulation_closer"]
    assert ptq["adversarial"]["int8_accuracy"]["rate"] < ptq["clean"]["int8_accuracy"]["rate"]
    qdq = models["lenet/ort-w8a8"]["deployment"]
    assert qdq["kind"] == "qat-qdq" and qdq["reference"] == "lenet/w8a8"
    for check in (qdq["clean"], qdq["adversarial"], qdq["patched"]):
        assert check["simulation"]["agreement"]["rate"] >= 0.99


def test_report_and_files_written(finished_run: Path) -> None:
    run = finished_run / "run"
    html = (run / "report.html").read_text()
    for section in ("Transfer across", "Spatial sensitivity", "Patch size", "Gradient alignment",
                    "Feature representations", "Quantization strength"):  # fmt: skip
        assert section in html
    header = (run / "results.csv").read_text().splitlines()[0]
    assert header.split(",") == csv_columns()
    assert list((run / "patches").glob("*.png"))
    assert list((run / "figures").glob("*.png"))


def test_rerun_reuses_everything(finished_run: Path, tiny_study_settings) -> None:
    run = finished_run / "run"
    before = {p.name: p.stat().st_mtime_ns for p in (run / "cells").glob("*.json")}
    config = load_study(None, **tiny_study_settings, cache_dir=finished_run / "cache")
    run_study(config, run, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (run / "cells").glob("*.json")}
    assert before == after


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"models": ["nope"]}, UnknownNameError),
        ({"attacks": [{"name": "nope"}]}, UnknownNameError),
        ({"precisions": ["w0a0"]}, ConfigError),
        ({"patch_sizes": [40]}, PatchTooLargeError),
        ({"n_eval": 0}, ConfigError),
        ({"unknown_field": 1}, ConfigError),
        ({"qat_overrides": {"w0a0": {"epochs": 1}}}, ConfigError),
        ({"attacks": [{"name": "universal", "params": {"stepz": 10}}]}, ConfigError),
        ({"attacks": [{"name": "patch-pgd", "params": {"steps": -1}}]}, ConfigError),
        ({"attacks": [{"name": "universal", "params": {"targeted": True}}]}, ConfigError),
        (
            {"attacks": [{"name": "universal", "params": {"targeted": True, "target_class": 10}}]},
            ConfigError,
        ),
        ({"device": "cuda:7"}, QuantpatchError),
    ],
)
def test_bad_studies_fail_before_work(tmp_path: Path, overrides, error) -> None:
    started = time.perf_counter()
    with pytest.raises(error):
        config = load_study(None, **overrides, cache_dir=tmp_path / "cache")
        run_study(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - started < 10


def test_attack_typo_names_the_attack_and_the_parameter(tmp_path: Path) -> None:
    config = load_study(None, attacks=[{"name": "universal", "params": {"stepz": 10}}])
    with pytest.raises(ConfigError, match=r"attack 'universal'.*stepz"):
        run_study(config, tmp_path / "run", progress=False)


def test_qat_overrides_apply_per_precision_only() -> None:
    config = load_study(None, qat={"epochs": 1}, qat_overrides={"W2A2": {"epochs": 4, "lr": 0.1}})
    assert config.qat_config_for(QuantSpec.parse("w2a2")).epochs == 4
    assert config.qat_config_for(QuantSpec.parse("w4a4")).epochs == 1


def test_invalid_spec_is_specific() -> None:
    from quantpatch.quant import QuantSpec

    with pytest.raises(InvalidSpecError):
        QuantSpec.parse("w33a8")


def test_feature_analysis_sees_the_patch(finished_run: Path) -> None:
    """Patched inputs differ from clean ones, and the patch's effect is localised (dominance >
    1 somewhere); guards against pasting into the shared evaluation tensors."""
    lenses = _results(finished_run / "run")["analyses"]["features"]["lenet"]["precisions"]["fp32"]
    assert any(v == v and v > 1 for _, v in lenses["dominance"])
    assert lenses["cka_patched"] != lenses["cka_clean"]


def test_every_attack_runs_from_a_yaml_study_via_the_cli(
    finished_run: Path, tiny_study_settings
) -> None:
    """The whole suite (issue 3) from a study file: every attack yields cells, the report shows
    the patch and pixel transfer matrices side by side and the masking check."""
    import yaml

    from quantpatch.cli import main

    attacks = [
        {"name": "universal", "params": {"steps": 10, "batch_size": 64}},
        {"name": "universal", "params": {"steps": 10, "targeted": True, "target_class": 0}},
        {"name": "lavan", "params": {"mode": "universal", "steps": 10}},
        {"name": "lavan", "params": {"mode": "universal", "steps": 10, "location": "search"}},
        {"name": "lavan", "params": {"mode": "per-image", "steps": 5}},
        {"name": "patch-pgd", "params": {"steps": 5}},
        {"name": "multibit", "params": {"steps": 10}},
        {"name": "pgd-linf", "params": {"eps": 0.1, "steps": 5}},
        {"name": "random"},
    ]
    settings = {
        **tiny_study_settings,
        "precisions": ["fp32", "w2a2"],  # models come from the module's cache
        "deployments": [],
        "controls": False,
        "attacks": attacks,
        "n_eval": 64,
        "analyses": {
            **tiny_study_settings["analyses"],
            "gradient_alignment": False,
            "features": False,
            "quant_strength": False,
            "size_curve": False,
        },  # fmt: skip
    }
    study = finished_run / "suite.yaml"
    study.write_text(yaml.safe_dump(settings))
    argv = ["run", str(study), "--out", str(finished_run / "suite"), "--quiet",
            "--cache-dir", str(finished_run / "cache")]  # fmt: skip
    assert main(argv) == 0
    cells = _results(finished_run / "suite")["cells"]
    assert {c["attack"] for c in cells} == {
        "universal", "universal-targeted", "lavan-universal", "lavan-universal-locationsearch",
        "lavan-per-image", "patch-pgd", "multibit", "pgd-linf", "random",
    }  # fmt: skip
    searched = {tuple(c["patch_location"]) for c in cells if c["attack"].endswith("search")}
    assert len(searched) >= 1 and all(len(loc) == 2 for loc in searched)
    assert all(c["patch_location"] is None for c in cells if not c["attack"].endswith("search"))
    multibit = {c["target"]: c["threat"] for c in cells if c["attack"] == "multibit"}
    assert multibit == {"lenet/fp32": "white-box ensemble", "lenet/w2a2": "white-box ensemble"}
    per_image = [
        c["rate"] for c in cells if c["attack"] == "patch-pgd" and c["threat"] == "white-box"
    ]
    noise = [c["rate"] for c in cells if c["attack"] == "random"]
    assert min(per_image) > max(noise)
    html = (finished_run / "suite" / "report.html").read_text()
    assert "Patch vs pixel attacks" in html and "masking" in html.lower()
    assert "Fit curves" in html and "Placement threat models" in html
