"""Defences in a study: every model behind every defence is a target (ORT int8 included),
adaptive cells attack through input defences, PatchCleanser certifies each model, and bad
defence settings fail before any training."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from quantpatch.errors import ConfigError, PatchTooLargeError
from quantpatch.report import build_report
from quantpatch.results import load_results
from quantpatch.study import load_study, run_study

BLUR = {"name": "gaussian-blur", "params": {"sigma": 1.5}}
CLEANSER = {"name": "patchcleanser", "params": {"patch_size": 8, "masks_per_axis": 2}}


@pytest.fixture(scope="module")
def defended_settings(tiny_study_settings) -> dict:
    """The tiny study cut down further (one epoch, w8a8 calibrated by min/max, one per-image
    attack, 48 images, also crafted on an independently trained fp32 model), behind a blur and
    PatchCleanser. (w8a8 stays: ORT int8's deployment check compares with it.)"""
    return {
        **tiny_study_settings,
        "name": "defended",
        "limit": 1000,
        "precisions": ["fp32", "w8a8"],
        "calibration": "minmax",
        "controls": False,
        "attacks": [
            {"name": "patch-pgd", "params": {"steps": 5}, "sources": ["fp32", "fp32-indep", "w8a8"]}
        ],  # fmt: skip
        "defenses": [BLUR, CLEANSER],
        "n_eval": 48,
        "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
        "analyses": {
            "gradient_alignment": False,
            "features": False,
            "spatial": False,
            "size_curve": False,
            "quant_strength": False,
        },
    }


@pytest.fixture(scope="module")
def defended_run(tmp_path_factory, defended_settings) -> Path:
    root = tmp_path_factory.mktemp("defended")
    config = load_study(None, **defended_settings, cache_dir=root / "cache")
    run_study(config, root / "run", progress=False)
    build_report(root / "run")
    return root / "run"


def test_every_model_behind_every_defence_is_a_target(defended_run: Path) -> None:
    results = load_results(defended_run)
    models = {m.name: m for m in results.models}
    plain = ["lenet/fp32", "lenet/w8a8", "lenet/ort-int8", "lenet/ort-w8a8"]
    expected = {*plain, *(f"{m}+{d}" for m in plain for d in ("gaussian-blur", "patchcleanser"))}
    assert set(models) == expected | {"lenet/fp32-indep"}  # a transfer source, never defended
    for name in expected - set(plain):
        model = models[name]
        assert model.defense == name.rpartition("+")[2]
        assert model.clean.n == 48 and 0 <= model.clean.ci_low <= model.clean.rate <= 1
        scored = [c for c in results.cells if c.target == name]
        assert scored and all(c.defense == model.defense and c.n > 0 for c in scored)
    assert all(c.defense is None for c in results.cells if c.target in plain)


def test_defended_targets_are_scored_on_their_own_attacks_only(defended_run: Path) -> None:
    """Behind a defence, a target sees its own model's attack and fp32's (transfer), never
    another bit-width's: those cells would cost PatchCleanser's masked forwards for nothing."""
    scored = {(c.source, c.target) for c in load_results(defended_run).cells}
    for defense in ("gaussian-blur", "patchcleanser"):
        assert ("lenet/w8a8", f"lenet/w8a8+{defense}") in scored
        assert ("lenet/fp32", f"lenet/w8a8+{defense}") in scored
        assert ("lenet/fp32", f"lenet/ort-int8+{defense}") in scored
        assert ("lenet/w8a8", f"lenet/fp32+{defense}") not in scored
        assert ("lenet/w8a8", f"lenet/ort-int8+{defense}") not in scored
    assert ("lenet/w8a8", "lenet/ort-int8") in scored  # undefended targets see every source


def test_adaptive_cells_cross_each_input_defence(defended_run: Path) -> None:
    cells = load_results(defended_run).cells
    adaptive = {(c.source, c.target): c for c in cells if c.adaptive}
    blur = "lenet/fp32+gaussian-blur"
    assert adaptive[(blur, blur)].adaptive_via == "exact"  # crafted through it, scored behind it
    # PatchCleanser is attacked through its surrogate (mean softmax over one-mask images);
    # the undefended model's attack scored behind it is the non-adaptive cell
    cleansed = "lenet/fp32+patchcleanser"
    cell = adaptive[(cleansed, cleansed)]
    assert cell.adaptive_via == "surrogate" and cell.threat == "white-box"
    blind = next(c for c in cells if (c.source, c.target) == ("lenet/fp32", cleansed))
    assert not blind.adaptive and blind.threat == "transfer"
    assert not any(c.adaptive for c in cells if "ort-int8" in c.target)  # no gradients there
    assert not any(c.adaptive for c in cells if "ort-w8a8" in c.target)
    w8a8_blur = "lenet/w8a8+gaussian-blur"
    assert adaptive[(w8a8_blur, w8a8_blur)].adaptive_via == "exact"  # every source precision
    # an adaptive cell is scored only on the target it was crafted through
    assert all(c.target == c.source for c in cells if "+" in c.source)


def test_patchcleanser_certifies_every_precision(defended_run: Path) -> None:
    models = {m.name: m for m in load_results(defended_run).models}
    for precision in ("fp32", "w8a8", "ort-int8"):
        model = models[f"lenet/{precision}+patchcleanser"]
        certified = model.certified
        assert (
            certified is not None
            and certified.patch_size == 8
            and certified.method.startswith("4 masks")
        )
        assert certified.certified.n == 48 and certified.clean == model.clean
        assert certified.certified.successes <= certified.clean.successes
    assert models["lenet/fp32+gaussian-blur"].certified is None


def test_adaptive_is_not_weaker_than_non_adaptive(defended_run: Path) -> None:
    """Attacking through the blur cannot do worse than ignoring it, beyond the intervals."""
    cells = load_results(defended_run).cells
    target = "lenet/fp32+gaussian-blur"
    (adaptive,) = [c for c in cells if c.target == target and c.adaptive]
    (blind,) = [c for c in cells if c.target == target and c.source == "lenet/fp32"]
    assert not blind.adaptive and adaptive.n == blind.n
    assert adaptive.ci_high >= blind.ci_low


def test_every_cell_has_its_unconditional_robust_accuracy(defended_run: Path) -> None:
    """Robust accuracy counts every image: at least the images right when clean that
    resisted ('0'), never more than the images not fooled; all n of them."""
    for cell in load_results(defended_run).cells:
        robust = cell.robust_accuracy
        assert robust is not None and robust.n == len(cell.outcomes) == 48
        resisted, fooled = cell.outcomes.count("0"), cell.outcomes.count("1")
        assert resisted <= robust.successes <= robust.n - fooled


def test_report_has_the_defences_section(defended_run: Path) -> None:
    html = (defended_run / "report.html").read_text()
    assert "Defences" in html and "Certified robust accuracy" in html
    assert "BPDA" in html or "exact gradients" in html
    assert list((defended_run / "figures").glob("defenses_*.png"))
    # the other sections keep to the undefended models: no defended target before "Defences"
    assert html.index("+gaussian-blur") > html.index('<h2 id="defences">')
    # PatchCleanser's adaptive cells go through its surrogate, and the table says so
    assert "through its differentiable surrogate" in html
    assert "robust accuracy" in html


def test_report_without_defences_has_no_section(defended_run: Path, tmp_path: Path) -> None:
    from quantpatch.report.defenses import defenses_section
    from quantpatch.report.html import undefended
    from quantpatch.report.page import Page
    from quantpatch.report.tables import ModelOrder

    results = undefended(load_results(defended_run))
    assert results.models and results.cells
    page = Page(tmp_path)
    defenses_section(page, results, ModelOrder(results.models), {})
    assert page.parts == []


@pytest.mark.parametrize(
    ("defense", "error", "match"),
    [
        ({"name": "nope"}, ConfigError, r"defenses.0.name.*unknown defense 'nope'"),
        (
            {"name": "median", "params": {"kernel_size": 4}},
            ConfigError,
            r"defense 'median': .*kernel_size.*odd",
        ),
        ({"name": "median", "params": {"kernel": 3}}, ConfigError, r"defense 'median': .*kernel"),
        ({"name": "jpeg", "params": {"quality": 0}}, ConfigError, r"defense 'jpeg': .*quality"),
        ({"name": "patchcleanser"}, ConfigError, r"defense 'patchcleanser': .*patch_size"),
        (
            {"name": "patchcleanser", "params": {"patch_size": 40}},
            PatchTooLargeError,
            r"defense 'patchcleanser'",
        ),
    ],
)
def test_bad_defences_fail_before_work(tmp_path: Path, defense, error, match) -> None:
    started = time.perf_counter()
    with pytest.raises(error, match=match):
        config = load_study(None, defenses=[defense], cache_dir=tmp_path / "cache")
        run_study(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("defense", [{"name": "nope"}, {"name": "lgs", "params": {"threshold": 2}}])
def test_cli_refuses_bad_defences_with_exit_2(tmp_path: Path, capsys, defense) -> None:
    from quantpatch.cli import main

    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"defenses": [defense]}))
    argv = ["run", str(study), "--out", str(tmp_path / "run"), "--quiet",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and defense["name"] in err
    assert not (tmp_path / "cache").exists()


def test_defences_are_opt_in_and_get_distinct_labels() -> None:
    assert load_study(None).defenses == []
    config = load_study(None, defenses=[{"name": "jpeg", "params": {"quality": 50}},
                                        {"name": "jpeg", "params": {"quality": 90}}])  # fmt: skip
    assert [d.label for d in config.defenses] == ["jpeg-quality50", "jpeg-quality90"]
    with pytest.raises(ConfigError):
        load_study(None, defenses=[{"name": "median"}, {"name": "median"}])


def test_the_defences_study_file_is_valid() -> None:
    """studies/defences.yaml names only known defences with valid parameters (PatchCleanser
    lives in studies/certified.yaml)."""
    from quantpatch.study.run.checks import validate_study

    config = load_study(Path(__file__).parents[1] / "studies" / "defences.yaml")
    validate_study(config)
    assert {d.name for d in config.defenses} == {
        "median", "gaussian-blur", "lgs", "jpeg", "bit-depth"
    }  # fmt: skip
    assert config.replicates >= 3
