"""A study killed midway resumes with nothing lost or recomputed, and the same results."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from quantpatch.study import load_study, run_study


def _settings(tiny: dict) -> dict:
    return {
        **tiny,
        "limit": 1000,
        "n_eval": 100,
        "train": {"epochs": 2, "lr": 0.05, "batch_size": 64},
        "precisions": ["fp32", "w4a4"],
        "deployments": [],
        "controls": False,
        "seeds": [0, 1],
        "attacks": [
            {"name": "universal", "params": {"steps": 15, "batch_size": 32}},
            {"name": "random"},
        ],  # fmt: skip
        "analyses": {
            "gradient_alignment": False,
            "features": False,
            "spatial": False,
            "size_curve": False,
            "quant_strength": False,
        },  # fmt: skip
    }


def _rates(run: Path) -> dict[tuple, tuple]:
    cells = json.loads((run / "results.json").read_text())["cells"]
    return {
        (c["source"], c["target"], c["attack"], c["seed"]): (c["successes"], c["n"]) for c in cells
    }


def test_killed_study_resumes(tmp_path: Path, tiny_study_settings: dict) -> None:
    settings = _settings(tiny_study_settings)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(settings))
    run, cache = tmp_path / "run", tmp_path / "cache"
    command = [sys.executable, "-m", "quantpatch.cli.main", "run", str(study), "--out", str(run),
               "--cache-dir", str(cache), "--quiet"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = run / "cells"
    deadline = time.monotonic() + 300
    while not list(cells.glob("*.json")) and time.monotonic() < deadline:
        assert process.poll() is None, "study finished before it could be interrupted"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    survivors = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    assert survivors, "no cell finished before the kill"
    assert not (run / "results.json").exists()
    # A kill can strand a ``.*.tmp`` file from atomic_path; nothing ever reads those.

    run_study(load_study(study, cache_dir=cache), run, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    assert all(after[name] == mtime for name, mtime in survivors.items())
    assert len(after) == 2 * (2 + 1)  # seeds x (universal on 2 precisions + random)

    # the fresh run trains its models in a process like the killed one (this test process may
    # run torch with another thread count, which moves float sums and so the trained weights)
    fresh = tmp_path / "fresh"
    subprocess.run([*command[:6], str(fresh), "--cache-dir", str(tmp_path / "fresh-cache"),
                    "--quiet"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    assert _rates(run) == _rates(fresh)
