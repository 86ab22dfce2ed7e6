"""A run folder belongs to one study; damaged cache entries and cell files are rebuilt;
concurrent runs share work instead of repeating or mixing it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantpatch.errors import ConfigError
from quantpatch.study import load_study, run_study

SMALL = {
    "name": "small",
    "limit": 400,
    "n_eval": 60,
    "models": ["lenet"],
    "precisions": ["fp32"],
    "deployments": [],
    "controls": False,
    "attacks": [{"name": "universal", "params": {"steps": 5, "batch_size": 32}},
                {"name": "random"}],
    "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
    "analyses": {"gradient_alignment": False, "features": False, "spatial": False,
                 "size_curve": False, "quant_strength": False},
    "device": "cpu",
}  # fmt: skip


def _run(tmp: Path, out: str = "run", **changes) -> Path:
    config = load_study(None, **{**SMALL, **changes}, cache_dir=tmp / "cache")
    return run_study(config, tmp / out, progress=False)


def _rates(results: Path) -> list[tuple]:
    cells = json.loads(results.read_text())["cells"]
    return sorted((c["source"], c["target"], c["attack"], c["successes"], c["n"]) for c in cells)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("folder")
    _run(tmp)
    return tmp


def test_a_different_study_is_refused_before_anything_is_written(finished: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in (finished / "run").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"belongs to study 'small', which differs in: n_eval"):
        _run(finished, n_eval=50)
    after = {p: p.stat().st_mtime_ns for p in (finished / "run").rglob("*") if p.is_file()}
    assert before == after


def test_the_same_study_resumes_and_device_does_not_count(finished: Path) -> None:
    results = _run(finished, device="auto")
    assert _rates(results)


@pytest.mark.parametrize("damage", ["truncate", "empty-list", "edit"])
def test_damaged_cell_files_are_reported_and_recomputed(
    tmp_path: Path, finished: Path, damage: str, capfd
) -> None:
    import shutil

    shutil.copytree(finished / "run", tmp_path / "run")
    shutil.copytree(finished / "cache", tmp_path / "cache")
    cell = sorted((tmp_path / "run" / "cells").glob("*.json"))[0]
    data = json.loads(cell.read_text())
    if damage == "truncate":
        cell.write_text(cell.read_text()[:50])
    elif damage == "empty-list":
        cell.write_text("[]")
    else:  # plausible but edited numbers
        data["payload"][0]["successes"] = 0
        data["payload"][0]["rate"] = 0.0
        cell.write_text(json.dumps(data))
    results = _run(tmp_path)
    assert "damaged cell file" in capfd.readouterr().err
    assert _rates(results) == _rates(finished / "run" / "results.json")


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_damaged_analysis_files_are_reported_and_recomputed(
    tmp_path: Path, finished: Path, damage: str, capfd
) -> None:
    """Analyses are sealed like cells: an edited or cut file is caught, never trusted."""
    import shutil

    shutil.copytree(finished / "cache", tmp_path / "cache")
    spatial = {**SMALL["analyses"], "spatial": True, "spatial_images": 8, "spatial_stride": 7}
    first = json.loads(_run(tmp_path, analyses=spatial).read_text())["analyses"]["sensitivity"]
    path = tmp_path / "run" / "analyses" / "sensitivity.json"
    data = json.loads(path.read_text())
    if damage == "truncate":
        path.write_text(path.read_text()[:40])
    else:  # a plausible but edited rate
        rates = next(iter(data["payload"]["maps"].values()))["rates"]
        rates[0][0] = 1.0 - rates[0][0]
        path.write_text(json.dumps(data))
    capfd.readouterr()
    again = json.loads(_run(tmp_path, analyses=spatial).read_text())["analyses"]["sensitivity"]
    assert "damaged analysis file" in capfd.readouterr().err
    assert again == first


@pytest.mark.parametrize("kind", ["models", "patches"])
def test_damaged_cache_entries_are_rebuilt(tmp_path: Path, finished: Path, kind: str, capfd):
    import shutil

    shutil.copytree(finished / "cache", tmp_path / "cache")
    entry = next((tmp_path / "cache" / kind).glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    results = _run(tmp_path)
    assert "damaged cache entry" in capfd.readouterr().err
    assert _rates(results) == _rates(finished / "run" / "results.json")
    _run(tmp_path, out="again")  # sealed again: no second warning
    assert "damaged" not in capfd.readouterr().err


def test_concurrent_runs_share_the_work(tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(SMALL))
    command = [sys.executable, "-m", "quantpatch.cli", "run", str(study), "--out",
               str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert len(list((tmp_path / "cache" / "models").glob("*.safetensors"))) == 1
    assert len(list((tmp_path / "run" / "cells").glob("*.json"))) == 2  # universal + random
    assert len(list((tmp_path / "run" / "patches").glob("*.png"))) == 2
