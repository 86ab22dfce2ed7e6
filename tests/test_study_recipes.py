"""Training defences in a study: every recipe's models join the grid at every precision next to
plain QAT, a random-precision model is a target and a source, the report compares them with
plain QAT, and bad recipe settings fail before any training."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantpatch.cli import main
from quantpatch.errors import ConfigError, PatchTooLargeError
from quantpatch.report import build_report
from quantpatch.results import load_results
from quantpatch.study import load_study, run_study
from quantpatch.study.run.checks import validate_against_data, validate_study

NO_ANALYSES = {"gradient_alignment": False, "features": False, "spatial": False,
               "size_curve": False, "quant_strength": False}  # fmt: skip


@pytest.fixture(scope="module")
def recipe_settings(tiny_study_settings) -> dict:
    """LeNet at fp32 and w2a2, trained plainly and by a random-precision recipe (one short
    epoch), attacked per image on plain w2a2, the recipe's w2a2 and its random model, and
    transferred from an fp32 model trained independently of the recipe."""
    return {
        **tiny_study_settings,
        "name": "recipes",
        "limit": 1000,
        "precisions": ["fp32", "w2a2"],
        "calibration": "minmax",
        "controls": False,
        "deployments": [],
        "recipes": [{"name": "random-precision"}],
        "attacks": [
            {
                "name": "patch-pgd",
                "params": {"steps": 3},
                "sources": [
                    "fp32",
                    "fp32-indep",
                    "w2a2",
                    "fp32-random-precision",
                    "w2a2-random-precision",
                    "random-random-precision",
                ],
            }
        ],  # fmt: skip
        "n_eval": 48,
        "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
        "analyses": NO_ANALYSES,
    }


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, recipe_settings) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    config = load_study(None, **recipe_settings, cache_dir=root / "cache")
    run_study(config, root / "run", progress=False)
    build_report(root / "run")
    return root / "run"


def test_recipe_models_join_the_grid_next_to_plain_qat(recipe_run: Path) -> None:
    results = load_results(recipe_run)
    models = {m.name: m for m in results.models}
    recipe = {"lenet/fp32-random-precision", "lenet/w2a2-random-precision",
              "lenet/random-random-precision"}  # fmt: skip
    assert set(models) == {"lenet/fp32", "lenet/fp32-indep", "lenet/w2a2", *recipe}
    assert all(models[name].recipe == "random-precision" for name in recipe)
    assert models["lenet/w2a2"].recipe is None
    assert models["lenet/w2a2-random-precision"].weight_bits == 2
    for name in recipe:  # each trained to a useful accuracy, not left at chance
        assert models[name].clean.rate > 0.6, (name, models[name].clean)
    scored = {(c.source, c.target) for c in results.cells}
    random = "lenet/random-random-precision"
    assert (random, random) in scored  # attacked through its random draws (EOT by sampling)
    assert ("lenet/fp32-random-precision", "lenet/w2a2-random-precision") in scored
    # the independent fp32 model: another seed, its own weights, a source for every target
    independent = models["lenet/fp32-indep"]
    assert independent.recipe is None and independent.clean.rate > 0.6
    assert independent.key != models["lenet/fp32"].key
    assert ("lenet/fp32-indep", "lenet/w2a2-random-precision") in scored


def test_report_compares_recipes_with_plain_qat(recipe_run: Path) -> None:
    html = (recipe_run / "report.html").read_text()
    assert "Training defences" in html
    assert "lenet/w2a2-random-precision" in html and "x plain" in html
    for column in (
        "robust accuracy",
        "transfer from plain fp32",
        "transfer from its fp32",
        "transfer from independent fp32",
    ):
        assert column in html, column


def test_a_rerun_reuses_the_trained_recipe(recipe_run: Path, recipe_settings, tmp_path) -> None:
    """The recipe's model is cached by content: a second study with the same settings loads
    it and gets the same clean predictions (same accuracy, same draws of precisions)."""
    cache = next(recipe_run.parent.glob("cache"))
    config = load_study(None, **recipe_settings, cache_dir=cache)
    run_study(config, tmp_path / "again", progress=False)
    first, second = load_results(recipe_run), load_results(tmp_path / "again")
    assert [m.clean for m in first.models] == [m.clean for m in second.models]


@pytest.mark.parametrize(
    ("recipe", "error", "match"),
    [
        ({"name": "dropout-everything"}, ConfigError, "unknown recipe"),
        ({"name": "patch-at", "params": {"steps": 0}}, ConfigError, "steps"),
        ({"name": "disalign", "params": {"strength": 1}}, ConfigError, "strength"),
        ({"name": "patch-at", "params": {"patch_size": 40}}, PatchTooLargeError, "40 px"),
        ({"name": "patch-at", "label": "ft"}, ConfigError, "already taken"),
    ],
)
def test_bad_recipes_fail_before_work(recipe_settings, tmp_path, recipe, error, match) -> None:
    from quantpatch.data import load_dataset

    with pytest.raises(error, match=match):
        config = load_study(None, **{**recipe_settings, "recipes": [recipe],
                                     "attacks": [{"name": "random"}]}, cache_dir=tmp_path)  # fmt: skip
        validate_study(config)
        validate_against_data(config, load_dataset("mnist5k", limit=100))
    assert not any(tmp_path.iterdir())


def test_cli_refuses_an_unknown_recipe_with_exit_2(tmp_path: Path, capsys) -> None:
    study = tmp_path / "study.yaml"
    study.write_text("recipes: [{name: nope}]\n")
    assert main(["run", str(study), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_sources_may_name_recipe_models_only_when_the_recipe_is_there(recipe_settings) -> None:
    with pytest.raises(ConfigError, match="w2a2-patch-at"):
        load_study(None, **{**recipe_settings, "attacks": [
            {"name": "patch-pgd", "sources": ["w2a2-patch-at"]}]})  # fmt: skip
