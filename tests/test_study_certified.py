"""Certified defences in a study: derandomized smoothing in front of plain models and of models
trained for it (fp32, QAT and the ORT int8 deployment of the certifiable fp32 model), its
certified-accuracy curve over patch sides, and the settings refused before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantpatch.errors import ConfigError
from quantpatch.report import build_report
from quantpatch.results import load_results
from quantpatch.study import load_study, run_study

SMOOTHING = {"name": "derandomized-smoothing", "params": {"patch_size": 2, "band": 4},
             "certify_sizes": [3, 5]}  # fmt: skip
PLAIN, CERT = "derandomized-smoothing", "derandomized-smoothing-cert"
CLEANSER = {"name": "patchcleanser", "params": {"patch_size": 5, "masks_per_axis": 3}}
SCHEDULE = {"epochs": 4, "lr": 0.05, "batch_size": 64}


@pytest.fixture(scope="module")
def certified_run(tmp_path_factory, tiny_study_settings) -> Path:
    settings = {
        **tiny_study_settings,
        "name": "certified",
        "limit": 1200,
        "precisions": ["fp32", "w8a8"],
        "calibration": "minmax",
        "controls": False,
        # crafted on fp32 (scored behind every defence) and through each surrogate (28
        # ablations or 9 masks per image): one place, two steps keep it cheap
        # sparse-rs queries each defended target's own decision, the int8 runtime's included
        "attacks": [{"name": "patch-pgd", "params": {"steps": 2, "location": "center"},
                     "sources": ["fp32"]},
                    {"name": "sparse-rs", "params": {"queries": 8},
                     "sources": ["fp32", "ort-int8"]}],  # fmt: skip
        "patch_sizes": [5],
        "n_eval": 64,
        "deployments": ["ort-int8"],
        "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
        "defenses": [SMOOTHING, {**SMOOTHING, "certifiable": True, "train": SCHEDULE},
                     CLEANSER, {**CLEANSER, "certifiable": True, "train": SCHEDULE}],
        "analyses": {"gradient_alignment": False, "features": False, "spatial": False,
                     "size_curve": False, "quant_strength": False},
    }  # fmt: skip
    root = tmp_path_factory.mktemp("certified")
    config = load_study(None, **settings, cache_dir=root / "cache")
    run_study(config, root / "run", progress=False)
    build_report(root / "run")
    return root / "run"


def test_certifiable_models_sit_only_behind_their_defence(certified_run: Path) -> None:
    models = {m.name: m for m in load_results(certified_run).models}
    certifiable = {"lenet/fp32-cert", "lenet/w8a8-cert", "lenet/ort-int8-cert"}
    assert {f"{m}+{CERT}" for m in certifiable} <= set(models)
    assert not certifiable & set(models)  # never undefended targets (their input is 2C)
    for name in ("lenet/fp32", "lenet/w8a8", "lenet/ort-int8"):
        assert f"{name}+{PLAIN}" in models
    for name, model in models.items():
        if model.certified is not None:
            expected = "certifiable" if "-cert+" in name else "plain"
            assert model.certified.base_training == expected, name


def test_certifiable_training_is_what_certifies(certified_run: Path) -> None:
    models = {m.name: m for m in load_results(certified_run).models}
    plain = models[f"lenet/fp32+{PLAIN}"].certified
    trained = models[f"lenet/fp32-cert+{CERT}"].certified
    assert plain is not None and trained is not None
    assert trained.certified.n == plain.certified.n == 64
    assert trained.certified.ci_low > plain.certified.ci_high, (trained, plain)
    assert trained.clean.rate >= 0.6, trained.clean
    # the int8 runtime certifies about as its float model does
    deployed = models[f"lenet/ort-int8-cert+{CERT}"].certified
    assert abs(deployed.certified.rate - trained.certified.rate) <= 0.1, (deployed, trained)


def test_mask_training_lifts_patchcleanser(certified_run: Path) -> None:
    models = {m.name: m for m in load_results(certified_run).models}
    for precision in ("fp32", "w8a8", "ort-int8"):
        plain = models[f"lenet/{precision}+patchcleanser"].certified
        trained = models[f"lenet/{precision}-cert+patchcleanser-cert"].certified
        assert (plain.base_training, trained.base_training) == ("plain", "certifiable")
        assert trained.certified.rate > plain.certified.rate, (precision, trained, plain)
        assert trained.curve == plain.curve == []  # it certifies its own patch size only


def test_the_curve_covers_every_size_and_falls(certified_run: Path) -> None:
    for model in load_results(certified_run).models:
        if model.certified is None or not model.defense.startswith(PLAIN):
            continue
        curve = model.certified.curve
        assert [p.patch_size for p in curve] == [2, 3, 5]
        assert curve[0].certified == model.certified.certified
        rates = [p.certified.rate for p in curve]
        assert rates == sorted(rates, reverse=True), (model.name, rates)


def test_undefended_attacks_reach_certifiable_models_only_as_transfer(certified_run: Path) -> None:
    cells = [c for c in load_results(certified_run).cells
             if "-cert+" in c.target and not c.adaptive]  # fmt: skip
    assert cells and {c.source for c in cells} == {"lenet/fp32"}
    assert {c.threat for c in cells} == {"transfer"}


def _certified_at(model, size: int) -> float:
    points = {p.patch_size: p.certified for p in model.certified.curve}
    points.setdefault(model.certified.patch_size, model.certified.certified)
    return points[size].rate


def test_adaptive_attacks_through_the_surrogates_never_beat_the_certificate(
    certified_run: Path,
) -> None:
    """Each certified fp32 target is attacked through its surrogate (soft vote, mean over
    masks); the share of images it leaves correct can never fall below the share certified
    against that patch side."""
    results = load_results(certified_run)
    models = {m.name: m for m in results.models}
    adaptive = {c.target: c for c in results.cells if c.adaptive and c.attack == "patch-pgd"}
    for name in (f"lenet/fp32+{PLAIN}", f"lenet/fp32-cert+{CERT}", "lenet/fp32+patchcleanser",
                 "lenet/fp32-cert+patchcleanser-cert"):  # fmt: skip
        cell = adaptive[name]
        assert cell.source == name and cell.adaptive_via == "surrogate", cell
        assert cell.robust_accuracy.rate >= _certified_at(models[name], cell.patch_size), name
    assert not any("ort-int8" in target for target in adaptive)  # no gradients there


def test_query_attacks_go_through_every_defended_decision(certified_run: Path) -> None:
    """sparse-rs queries each defence's real decision (its graded scores), on fp32 and on the
    ORT int8 session alike: one query-only cell per defended target, scored on it alone, and
    never leaving fewer images correct than the certificate guarantees."""
    results = load_results(certified_run)
    models = {m.name: m for m in results.models}
    defended = {name for name, m in models.items()  # sources: fp32 and ort-int8
                if m.defense is not None and "w8a8" not in name}  # fmt: skip
    queried = [c for c in results.cells if c.adaptive and c.attack == "sparse-rs"]
    assert {c.target for c in queried} == defended
    for cell in queried:
        assert cell.source == cell.target, cell
        assert (cell.threat, cell.adaptive_via) == ("query-only", "queries"), cell
        assert cell.robust_accuracy.rate >= _certified_at(models[cell.target], cell.patch_size)
    behind = {c.threat for c in results.cells
              if c.attack == "sparse-rs" and not c.adaptive and "+" in c.target}  # fmt: skip
    assert behind == {"transfer"}  # found on the bare model, then scored through the defence
    report = (certified_run / "report.html").read_text()
    assert "(sparse-rs, 5 px; certified" in report and "below the certificate" not in report


@pytest.mark.parametrize(
    ("defense", "match"),
    [
        ({"name": "jpeg", "certifiable": True}, r"defense 'jpeg-cert': certifiable training"),
        (
            {"name": "patchcleanser", "params": {"patch_size": 5}, "certify_sizes": [3]},
            r"defense 'patchcleanser': certify_sizes",
        ),  # fmt: skip
        ({**SMOOTHING, "certify_sizes": [20]}, r"cannot certify a 20px patch"),
        ({**SMOOTHING, "train": {"epochs": 1}}, r"train is the schedule of certifiable"),
    ],
)
def test_bad_certified_settings_fail_before_work(tmp_path: Path, defense, match) -> None:
    with pytest.raises(ConfigError, match=match):
        config = load_study(None, defenses=[defense], cache_dir=tmp_path / "cache")
        run_study(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_cli_refuses_certifiable_training_without_a_certificate(tmp_path: Path, capsys) -> None:
    import yaml

    from quantpatch.cli import main

    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"defenses": [{"name": "median", "certifiable": True}]}))
    argv = ["run", str(study), "--out", str(tmp_path / "run"), "--quiet",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "certifiable training" in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
