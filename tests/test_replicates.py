"""Trained replicates: every model trained N times from independent seeds, each its own cache
entry, cells per replicate, and a report whose intervals cover the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantpatch.report import build_report
from quantpatch.study import load_study, run_study

SMALL = {
    "name": "replicated",
    "limit": 400,
    "n_eval": 50,
    "models": ["lenet"],
    "precisions": ["fp32", "w4a4"],
    "deployments": ["ort-int8"],
    "controls": False,
    "attacks": [{"name": "random"}, {"name": "pgd-linf", "params": {"eps": 0.1, "steps": 3}}],
    "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
    "qat": {"epochs": 1, "lr": 0.01},
    "qat_overrides": {},
    "analyses": {"gradient_alignment": False, "features": False, "spatial": False,
                 "size_curve": False, "quant_strength": False},
    "device": "cpu",
}  # fmt: skip


@pytest.fixture(scope="module")
def replicated(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("replicates")
    config = load_study(None, **SMALL, replicates=2, cache_dir=tmp / "cache")
    run_study(config, tmp / "run", progress=False)
    return tmp


def _results(tmp: Path, run: str = "run") -> dict:
    return json.loads((tmp / run / "results.json").read_text())


def test_every_model_and_cell_is_replicated(replicated: Path) -> None:
    results = _results(replicated)
    models = {(m["name"], m["replicate"]): m for m in results["models"]}
    assert set(models) == {(name, k) for name in ("lenet/fp32", "lenet/w4a4", "lenet/ort-int8")
                           for k in (0, 1)}  # fmt: skip
    for name in ("lenet/fp32", "lenet/w4a4", "lenet/ort-int8"):
        assert models[(name, 0)]["key"] != models[(name, 1)]["key"]  # its own cache entry
    cells = results["cells"]
    assert {c["replicate"] for c in cells} == {0, 1}
    for cell in cells:
        outcomes = cell["outcomes"]
        assert outcomes.count("1") == cell["successes"]
        assert len(outcomes) - outcomes.count(".") == cell["n"]
    # each replicate crafts on its own models: the white-box pixel cells differ between them
    white = {c["replicate"]: c["outcomes"] for c in cells
             if c["attack"] == "pgd-linf" and c["source"] == c["target"] == "lenet/fp32"}  # fmt: skip
    assert white[0] != white[1]


def test_a_replicate_never_reuses_another_seeds_model(replicated: Path, tmp_path: Path) -> None:
    """Replicate 1 trains from seed + 1000; a study whose own seed is 1000 trains the same
    weights for its replicate 0, yet the cache key holds the replicate, so they never mix."""
    train = {**SMALL["train"], "seed": 1000}
    config = load_study(None, **{**SMALL, "train": train}, cache_dir=replicated / "cache")
    results = json.loads(run_study(config, tmp_path / "run", progress=False).read_text())
    theirs = {m["key"] for m in results["models"]}
    ours = {m["key"] for m in _results(replicated)["models"] if m["replicate"] == 1}
    assert not theirs & ours


def test_the_report_says_what_its_intervals_cover(replicated: Path, tmp_path: Path) -> None:
    page = build_report(replicated / "run").read_text()
    assert "trained 2 times from independent seeds" in page
    assert "each trained replicate" in page
    config = load_study(None, **SMALL, cache_dir=replicated / "cache")
    run_study(config, tmp_path / "one", progress=False)
    assert "Model variance is unmeasured" in build_report(tmp_path / "one").read_text()


def test_clean_accuracy_is_the_mean_over_replicates_with_their_spread() -> None:
    """The figures and tables read a model's clean accuracy over every trained replicate:
    the mean, with an interval that widens when the replicates disagree."""
    from quantpatch.metrics import Rate, wilson_interval
    from quantpatch.report.tables import clean_by_model
    from quantpatch.results import ModelRecord, RateRecord

    def model(replicate: int, correct: int) -> ModelRecord:
        return ModelRecord(name="lenet/fp32", arch="lenet", precision="fp32", runtime="torch",
                           weight_bits=None, weight_levels=None, act_bits=None, key=f"k{replicate}",
                           replicate=replicate, clean=RateRecord.of(Rate(correct, 200)))  # fmt: skip

    agree = clean_by_model([model(0, 180), model(1, 180)])["lenet/fp32"]
    apart = clean_by_model([model(1, 140), model(0, 180)])["lenet/fp32"]
    assert apart.rate == pytest.approx(0.8) and [r.rate for r in apart.per_replicate] == [0.9, 0.7]
    assert apart.ci[0] < 0.72 and apart.ci[1] > 0.88  # both trained models inside
    assert apart.ci[1] - apart.ci[0] > 2 * (agree.ci[1] - agree.ci[0])
    one = clean_by_model([model(0, 180)])["lenet/fp32"]
    assert one.replicates == 1 and one.ci == pytest.approx(wilson_interval(180, 200))


def test_the_report_reads_clean_accuracy_over_replicates(replicated: Path) -> None:
    page = build_report(replicated / "run").read_text()
    assert "clean accuracy (mean over replicates)" in page
    assert "mean over its trained replicates" in page
