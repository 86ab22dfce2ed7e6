"""Study configuration: labels, subsets and cache keys that keep results honest."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from quantpatch.data import Split
from quantpatch.deployments import DEPLOYMENTS, Deployment
from quantpatch.errors import ConfigError
from quantpatch.quant import QuantSpec
from quantpatch.report.tables import SeedRate, pool
from quantpatch.study import AnalysisSettings, Shortcuts, load_study
from quantpatch.study.run.checks import validate_study
from quantpatch.study.settings.config import ANALYSIS_SWITCHES
from quantpatch.study.store.cache import EVAL_CODE, MODEL_CODE, PACKAGE_ROOT, code_fingerprint


def test_attacks_that_differ_in_a_parameter_get_different_labels() -> None:
    config = load_study(
        None,
        attacks=[
            {"name": "pgd-linf", "params": {"eps": 0.1}},
            {"name": "pgd-linf", "params": {"eps": 0.2, "steps": 5}},
            {"name": "universal", "params": {"targeted": True, "target_class": 3}},
            {"name": "universal", "params": {"targeted": True, "target_class": 4}},
            {"name": "random"},
            {"name": "lavan", "params": {"mode": "per-image"}, "label": "mine"},
        ],
    )
    labels = [a.label for a in config.attacks]
    assert labels == [
        "pgd-linf-eps0.1",
        "pgd-linf-eps0.2-steps5",
        "universal-targeted-target_class3",
        "universal-targeted-target_class4",
        "random",
        "mine",
    ]


@pytest.mark.parametrize(
    "settings",
    [
        {"attacks": [{"name": "random"}, {"name": "random"}]},
        {"attacks": []},
        {"seeds": [0, 0]},
        {"seeds": [2**64]},
        {"seeds": [-1]},
        {"patch_sizes": [7, 7]},
        {"models": ["lenet", "lenet"]},
        {"precisions": ["w4a4", "W4A4"]},
        {"name": "../escape"},
        {"name": "/abs"},
        {"name": ""},
        {"name": ".hidden"},
        {"train_overrides": {"lenett": {"epochs": 1}}},
        {"qat_overrides": {"w4a4": {"epochs": 1}}, "precisions": ["fp32", "w2a2"]},
        {"analyses": {"models": ["resnet"]}},
        {"analyses": {"size_fractions": [1.5]}},
        {"analyses": {"strength_bits": [0]}},
        {"attacks": [{"name": "patch-pgd", "sources": ["w3a3"]}]},
        {"attacks": [{"name": "patch-pgd", "sources": []}]},
    ],
)
def test_impossible_or_ambiguous_studies_are_refused(settings: dict) -> None:
    with pytest.raises(ConfigError):
        load_study(None, **settings)


def test_attack_sources_name_precisions_and_controls() -> None:
    config = load_study(
        None, attacks=[{"name": "patch-pgd", "sources": ["fp32", "w2a2", "fp32-ft"]}]
    )
    assert config.attacks[0].sources == ["fp32", "w2a2", "fp32-ft"]
    assert not config.independent_source
    independent = load_study(None, attacks=[{"name": "patch-pgd", "sources": ["fp32-indep"]}])
    assert independent.independent_source


def test_defaults_may_name_what_a_study_leaves_out() -> None:
    config = load_study(None, models=["resnet20"], precisions=["fp32", "w4a4"])
    assert config.lens_models == ["resnet20"]


def test_stratified_subsets_follow_class_shares_and_the_seed() -> None:
    labels = torch.arange(10).repeat_interleave(torch.tensor([50] * 5 + [10] * 5))  # skewed
    split = Split(torch.zeros(len(labels), 1, 2, 2), labels)
    subset = split.stratified(60, seed=3)
    counts = torch.bincount(subset.labels, minlength=10)
    assert counts[:5].tolist() == [10] * 5 and counts[5:].tolist() == [2] * 5
    assert torch.equal(subset.labels, split.stratified(60, seed=3).labels)
    assert not torch.equal(subset.labels, split.stratified(60, seed=4).labels)
    assert torch.equal(split.stratified(20, seed=3).labels, subset.labels[:20])  # prefixes


def test_code_changes_change_the_right_cache_keys(tmp_path: Path) -> None:
    copy = tmp_path / "quantpatch"
    shutil.copytree(PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = (code_fingerprint(*MODEL_CODE, root=copy), code_fingerprint(*EVAL_CODE, root=copy))
    attack = copy / "attacks" / "base.py"
    attack.write_text(attack.read_text() + "\n# a fix\n")
    code_fingerprint.cache_clear()  # fingerprints are cached per process
    after = (code_fingerprint(*MODEL_CODE, root=copy), code_fingerprint(*EVAL_CODE, root=copy))
    assert after[0] == before[0]  # trained models stay valid
    assert after[1] != before[1]  # patches, cells and analyses are recomputed
    report = copy / "report" / "html.py"
    report.write_text(report.read_text() + "\n# wording\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint(*EVAL_CODE, root=copy) == after[1]  # the report computes nothing


def test_seeds_are_not_pooled_as_more_images() -> None:
    from quantpatch.metrics import Rate
    from quantpatch.results import CellRecord, RateRecord, Timings

    def cell(seed: int, successes: int) -> CellRecord:
        return CellRecord(
            **RateRecord.of(Rate(successes, 100)).model_dump(),
            study="s", dataset="d", cell="c", source="a/fp32", source_arch="a",
            source_precision="fp32", target="a/w4a4", target_arch="a", target_precision="w4a4",
            threat="transfer", attack="universal", attack_name="universal",
            attack_kind="patch", targeted=False, target_class=None, patch_size=7,
            patch_area=0.1, seed=seed, target_clean_accuracy=0.9,
            timings=Timings(fit_s=0, perturb_s=0, eval_s=0),
        )  # fmt: skip

    one = pool([cell(0, 40)])
    three = pool([cell(0, 40), cell(1, 40), cell(2, 40)])
    assert isinstance(three, SeedRate) and three.n == 100 and three.seeds == 3
    assert three.ci == one.ci  # same images: the interval does not shrink with seeds
    spread = pool([cell(0, 30), cell(1, 50)])
    assert spread.rate == pytest.approx(0.4) and spread.spread > 0.1


def test_default_attacks_craft_per_image_attacks_on_the_ends_of_the_bit_range() -> None:
    """The demo's per-image attacks go on fp32 and the study's lowest bit-width, whichever
    precisions the study names; the universal and random patches on every model."""
    sources = {a.name: a.sources for a in load_study(None).attacks}
    assert sources == {"universal": None, "patch-pgd": ["fp32", "w2a2"],
                       "pgd-linf": ["fp32", "w2a2"], "random": None}  # fmt: skip
    narrowed = load_study(None, precisions=["fp32", "w8a8", "w4a4"]).attacks
    assert {a.name: a.sources for a in narrowed}["patch-pgd"] == ["fp32", "w4a4"]


STUDIES = sorted((Path(__file__).parents[1] / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_validate(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shipped study validates; one that names an optional runtime (deployments.yaml)
    is refused only for a runtime that is really missing here, and validates in full once
    the runtimes count as installed."""
    config = load_study(path)
    missing = [n for n in config.deployed_precisions if not _installed(DEPLOYMENTS.get(n))]
    if missing:
        with pytest.raises(ConfigError, match=r"needs .*: pip install 'quantpatch\["):
            validate_study(config)
        monkeypatch.setattr(Deployment, "require", lambda self: None)
    validate_study(config)


def _installed(deployment: type[Deployment]) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in deployment.modules)


def test_placement_study_pairs_both_threat_models() -> None:
    """EOT random placement and LaVAN at a searched fixed location, same budget, every model."""
    config = load_study(Path(__file__).parents[1] / "studies" / "placement.yaml")
    attacks = {a.name: a for a in config.attacks}
    eot, fixed = attacks["universal"], attacks["lavan"]
    assert fixed.params["location"] == "search" and fixed.params["mode"] == "universal"
    assert eot.params["steps"] == fixed.params["steps"] and "eot" not in eot.params
    assert eot.sources is None and fixed.sources is None and len(config.precisions) >= 4


def test_lowest_precision_is_one_rule_on_a_w2a8_and_w4a4_study() -> None:
    """Weight bits first: w2a8 is this study's lowest precision for the config, the default
    attacks' sources and the analyses alike (a sum of bits would pick w4a4)."""
    from quantpatch.quant import QuantSpec
    from quantpatch.study.run.analyses import _lowest_precision

    config = load_study(None, precisions=["fp32", "w4a4", "w2a8"])
    assert config.lowest_precision == QuantSpec.parse("w2a8")
    assert {a.name: a.sources for a in config.attacks}["patch-pgd"] == ["fp32", "w2a8"]

    class Model:
        def __init__(self, name: str) -> None:
            self.spec, self.name = QuantSpec.parse(name), name

    class Context:
        def siblings(self, arch: str):
            return tuple(Model(n) for n in ("fp32", "w4a4", "w2a8"))

    assert _lowest_precision(Context(), "lenet").name == "w2a8"


@pytest.mark.parametrize("replicates", [0, 101, -1, 2.5])
def test_replicates_outside_1_to_100_are_refused(replicates) -> None:
    with pytest.raises(ConfigError, match="replicates"):
        load_study(None, replicates=replicates)


def test_shortcuts_change_every_schedule_and_attack_they_name() -> None:
    """--epochs/--qat-epochs reach every per-name override (defaults included, keeping their
    learning rates); --steps every attack that takes a budget and no other."""
    config = load_study("studies/demo.yaml", shortcuts=Shortcuts(epochs=1, qat_epochs=4, steps=7))
    assert config.train.epochs == 1 and config.qat.epochs == 4
    assert {p.name: t.epochs for p, t in config.qat_overrides.items()} == {"w2a2": 4}
    assert config.qat_overrides[QuantSpec.parse("w2a2")].lr == 0.05  # kept, only epochs change
    steps = {a.name: a.params.get("steps") for a in config.attacks}
    assert steps == {"universal": 7, "patch-pgd": 7, "pgd-linf": 7, "random": None}
    assert config.attacks[1].sources == ["fp32", "w2a2"]  # the defaults' other settings stay
    assert config.replicates == 3 and config.analyses.features  # untouched


def test_quick_is_a_smoke_run_and_explicit_shortcuts_win() -> None:
    config = load_study("studies/demo.yaml", shortcuts=Shortcuts(quick=True, steps=3))
    assert (config.replicates, config.n_eval, config.train.epochs, config.qat.epochs) == (
        1, 100, 1, 1)  # fmt: skip
    assert {a.name: a.params.get("steps") for a in config.attacks} == {
        "universal": 3, "patch-pgd": 3, "pgd-linf": 3, "random": None}  # fmt: skip
    switches = {name: getattr(config.analyses, name) for name in ANALYSIS_SWITCHES}
    assert switches == dict.fromkeys(ANALYSIS_SWITCHES, False)
    bools = {n for n, f in AnalysisSettings.model_fields.items() if f.annotation in (bool, "bool")}
    assert bools == set(ANALYSIS_SWITCHES)  # every analysis has its switch
    kept = load_study(None, n_eval=40, shortcuts=Shortcuts(quick=True))
    assert kept.n_eval == 40  # quick never raises a smaller n


def test_quick_fits_any_study_and_explicit_settings_win() -> None:
    """--quick on a study without w2a2 (whose QAT the defaults tune) still validates; an
    explicit --n-eval or --replicates beats it; --qat-epochs reaches a recipe's own QAT."""
    no_w2a2 = load_study(None, precisions=["fp32", "w8a8"], shortcuts=Shortcuts.of(quick=True))
    assert no_w2a2.qat.epochs == 1 and no_w2a2.attacks[1].sources == ["fp32", "w8a8"]
    kept = load_study(None, n_eval=500, replicates=3, shortcuts=Shortcuts.of(quick=True))
    assert (kept.n_eval, kept.replicates) == (500, 3)
    recipe = load_study(None, recipes=[{"name": "patch-at", "qat": {"epochs": 5}}],
                        shortcuts=Shortcuts.of(qat_epochs=2))  # fmt: skip
    assert recipe.recipes[0].qat.epochs == 2


def test_analyses_shortcut_picks_lenses_by_name() -> None:
    picked = load_study(None, shortcuts=Shortcuts.of(analyses=["features", "size-curve"]))
    on = {name for name in ANALYSIS_SWITCHES if getattr(picked.analyses, name)}
    assert on == {"features", "size_curve"}
    everything = load_study(None, shortcuts=Shortcuts.of(quick=True, analyses=["all"]))
    assert all(getattr(everything.analyses, name) for name in ANALYSIS_SWITCHES)
    assert Shortcuts.of(analyses=["none"]).analyses == []
    with pytest.raises(ConfigError, match="unknown analysis saliency; known: none, all"):
        Shortcuts.of(analyses=["saliency"])


def test_every_study_schema_field_has_a_description() -> None:
    from quantpatch.study.settings.config import StudyConfig

    schema = StudyConfig.model_json_schema()
    models = {"StudyConfig": schema, **schema.get("$defs", {})}
    missing = [f"{model}.{field}"
               for model, definition in models.items()
               for field, prop in definition.get("properties", {}).items()
               if not prop.get("description")]  # fmt: skip
    assert not missing, f"study-schema fields without a description: {', '.join(missing)}"


def test_nan_and_inf_settings_are_refused() -> None:
    for change in ({"train": {"lr": float("inf")}}, {"n_eval": 10, "analyses": {
            "size_fractions": [float("nan")]}}):  # fmt: skip
        with pytest.raises(ConfigError, match="finite number"):
            load_study(None, **change)
