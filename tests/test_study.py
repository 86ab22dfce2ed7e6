"""End-to-end: a tiny study runs every stage, writes valid results, and reruns from cache."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from quantpatch.cli import main
from quantpatch.errors import (
    ConfigError,
    InvalidSpecError,
    PatchTooLargeError,
    QuantpatchError,
    UnknownNameError,
)
from quantpatch.quant import QuantSpec
from quantpatch.report import build_report
from quantpatch.report.compare import compare_runs
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
    patches = list((run / "patches").glob("*.png"))
    assert patches and list((run / "figures").glob("*.png"))
    for png in patches:  # each patch has its applied example and the source's verdict
        note = json.loads((run / "patches" / "examples" / f"{png.stem}.json").read_text())
        assert (run / "patches" / "examples" / png.name).is_file()
        assert note["label"] in range(10) and note["prediction"] in range(10)
        assert note["predicted_by"] == note["source"] or note["source"] == "none"
        if note["clean_prediction"] == note["label"]:  # the ASR rule: counted, then judged
            assert note["fooled"] == (note["prediction"] != note["label"])
        else:
            assert note["fooled"] is None
    assert html.count(" says ") == len(patches)  # the gallery shows every one (1 replicate)
    for row in re.findall(r"<tr>(.*?)</tr>", html):  # no empty row: one label, then values
        values = re.findall(r"<td[^>]*>(.*?)</td>", row)[1:]
        assert not values or any(v not in ("", "–") for v in values), row
    for anchor in re.findall(r'<a href="#([^"]+)"', html):  # every TOC link lands
        assert f'id="{anchor}"' in html


def test_rerun_reuses_everything(finished_run: Path, tiny_study_settings, capsys) -> None:
    run = finished_run / "run"
    before = {p.name: p.stat().st_mtime_ns for p in (run / "cells").glob("*.json")}
    config = load_study(None, **tiny_study_settings, cache_dir=finished_run / "cache")
    run_study(config, run, progress=True)
    after = {p.name: p.stat().st_mtime_ns for p in (run / "cells").glob("*.json")}
    assert before == after
    # the stage log stays on screen, time-stamped; nothing ran again, so no cell line
    log = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] models for lenet ready in [\d.]+ s", log[0])
    accuracy = [line for line in log if "clean accuracy" in line]
    assert len(accuracy) == len(_results(run)["models"])
    assert re.fullmatch(r"\[[\d:]+\] lenet/w2a2: clean accuracy [\d.]+ % of 200 images",
                        next(line for line in accuracy if "lenet/w2a2:" in line))  # fmt: skip
    assert re.fullmatch(rf"\[[\d:]+\] {len(before)} cells done in [\d.]+ s", log[-1])
    assert not any(" cell " in line for line in log)


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


def _changed_run(finished_run: Path, name: str, flip_first_universal: bool) -> Path:
    """A copy of the finished run's results; optionally its first white-box universal cell
    fooling every image it counts (a rate far outside the original's interval)."""
    data = _results(finished_run / "run")
    if flip_first_universal:
        cell = min((c for c in data["cells"]
                    if c["attack"] == "universal" and c["source"] == c["target"]),
                   key=lambda c: c["rate"])  # fmt: skip
        assert cell["rate"] < 0.9  # room to move beyond its interval
        cell.update(successes=cell["n"], rate=1.0, ci_low=0.98, ci_high=1.0,
                    outcomes=cell["outcomes"].replace("0", "1"))  # fmt: skip
    folder = finished_run / name
    folder.mkdir(exist_ok=True)
    (folder / "results.json").write_text(json.dumps(data))
    return folder


def test_compare_marks_only_rates_beyond_the_intervals(finished_run: Path, capsys) -> None:
    same = _changed_run(finished_run, "same", flip_first_universal=False)
    changed = _changed_run(finished_run, "changed", flip_first_universal=True)
    comparison = compare_runs([finished_run / "run", same, changed])
    assert comparison.runs == ("run", "same", "changed") and comparison.only_some == 0
    marked = [row for row in comparison.rows if any(row.differs)]
    assert len(marked) == 1 and marked[0].differs == (False, True)
    assert marked[0].what.startswith("ASR · universal 8px · lenet/")
    clean = [row for row in comparison.rows if row.what.startswith("clean accuracy")]
    assert len(clean) == len(_results(finished_run / "run")["models"])
    out = finished_run / "compare.html"
    assert main(["compare", str(finished_run / "run"), str(changed), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 of " in printed and "marked *" in printed
    assert sum(line.endswith(" *") for line in printed.splitlines()) == 1
    page = out.read_text()
    assert page.count('class="diag"') == 1 and "data:image/png;base64" in page


def test_compare_refuses_one_run_and_missing_folders(finished_run: Path, capsys) -> None:
    assert main(["compare", str(finished_run / "run")]) == 2
    assert main(["compare", str(finished_run / "run"), str(finished_run / "nope")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "at least two" in errors[0] and "nope" in errors[1]


def test_plots_draw_the_report_figures_from_results(finished_run: Path) -> None:
    from quantpatch.report import plots

    run = finished_run / "run"
    results = load_results(run)
    assert plots.clean_accuracy(results).axes[0].get_ylim()[0] == 0
    heatmap = plots.transfer(run, "universal", 8)
    labels = [t.get_text() for t in heatmap.axes[0].get_xticklabels()]
    assert "lenet\nw2a2" in labels and "lenet\nort-int8" in labels
    assert len(plots.asr_vs_precision(results, "universal", 8).axes) == 1
    with pytest.raises(ConfigError, match="the results hold: random 8, universal 8"):
        plots.transfer(results, "patch-pgd", 8)


CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)

CHECKS = """() => {
  const blank = [...document.images].filter(img => {
    if (!img.complete || img.naturalWidth === 0) return true;
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const ctx = canvas.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 4; i < data.length; i += 4)
      for (let c = 0; c < 3; c++) if (data[i + c] !== data[c]) return false;
    return true;  // one colour everywhere: blank
  }).map(img => img.alt);
  const emptyRows = [...document.querySelectorAll('tr')].filter(tr => {
    const cells = [...tr.querySelectorAll('td')].slice(1).map(td => td.textContent.trim());
    return cells.length > 0 && cells.every(c => c === '' || c === '–');
  }).map(tr => tr.textContent.slice(0, 80));
  const deadLinks = [...document.querySelectorAll('nav.toc a')]
    .filter(a => !document.getElementById(a.hash.slice(1))).map(a => a.hash);
  return {images: document.images.length, blank, emptyRows, deadLinks,
          toc: document.querySelectorAll('nav.toc a').length};
}"""


@pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="pip install playwright")
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_report_renders_in_chromium(finished_run: Path) -> None:
    """The report in headless Chromium (Playwright): no console error, every image decodes to
    something not blank, no empty table row, every table-of-contents link lands. A screenshot
    goes to $QUANTPATCH_ARTIFACTS (CI's output folder) when set. `.ci/run` installs Debian's
    chromium; without it (or Playwright) the test is skipped, saying why."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto((finished_run / "run" / "report.html").as_uri(), wait_until="load")
        found = page.evaluate(CHECKS)
        artifacts = os.environ.get("QUANTPATCH_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(artifacts) / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert found["images"] > 5 and found["blank"] == [], found["blank"]
    assert found["emptyRows"] == [], found["emptyRows"]
    assert found["toc"] > 3 and found["deadLinks"] == [], found["deadLinks"]


def test_runtime_section_says_whether_attacks_reach_the_deployed_model(finished_run: Path) -> None:
    html = (finished_run / "run" / "report.html").read_text()
    assert "Integer runtimes: do attacks reach the deployed model?" in html
    assert "<td>lenet/ort-w8a8</td><td>lenet/w8a8</td>" in html  # QDQ export of the QAT model
    assert "Attacks reach the deployed model on every runtime" in html  # same images, same bits
    # a runtime that resisted every image crafted on its own model is called out
    data = _results(finished_run / "run")
    for cell in data["cells"]:
        if cell["target"] == "lenet/ort-w8a8" and cell["source"] == "lenet/w8a8":
            cell.update(successes=0, rate=0.0, ci_low=0.0, ci_high=0.02,
                        outcomes=cell["outcomes"].replace("1", "0"))  # fmt: skip
    resisted = finished_run / "resisted"
    resisted.mkdir(exist_ok=True)
    (resisted / "results.json").write_text(json.dumps(data))
    page = build_report(resisted).read_text()
    assert "the runtime is fooled less than its own model beyond the intervals" in page
    assert "<td>no: " in page
