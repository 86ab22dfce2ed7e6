"""The command line: registries, bad input -> one stderr line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quantpatch.cli import main


def test_list_models_and_attacks(capsys) -> None:
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "lenet" in out and "resnet20" in out and "tv:<name>" in out
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    for name in ("universal", "random", "lavan", "patch-pgd", "multibit", "pgd-linf"):
        assert name in out


def test_schema_prints_json(capsys) -> None:
    import json

    assert main(["schema", "results"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "cells" in schema["properties"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--models", "nope"], "unknown model 'nope'"),
        (["run", "--precisions", "w0a0"], "w0a0"),
        (["run", "--precisions", "w33a8"], "w33a8"),
        (["run", "--attacks", "nope"], "unknown attack"),
        (["run", "--patch-size", "29"], "larger than"),
        (["run", "--dataset", "cifar10", "--data-root", "/nonexistent/x"], "cifar10"),
        (["run", "--dataset", "nope"], "unknown dataset"),
        (["run", "missing-study.yaml"], "not found"),
        (["report", "/nonexistent/run"], "not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, args, needle) -> None:
    code = main([*args, "--out", str(tmp_path / "run")] if args[0] == "run" else args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("quantpatch: error:")
    assert needle in err


def test_corrupt_checkpoint_exits_2(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    args = ["train", "--model", "lenet", "--limit", "300", "--epochs", "1",
            "--cache-dir", str(cache), "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()  # drop the training progress bar
    checkpoint = next((cache / "models").glob("*.safetensors"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "corrupt" in err and len(err.splitlines()) == 1


def test_console_entry_point_runs_as_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "quantpatch.cli.main", "run", "--precisions", "w9a9"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("what", ["study", "results"])
def test_documented_schemas_are_current(what: str, capsys) -> None:
    import json

    assert main(["schema", what]) == 0
    printed = json.loads(capsys.readouterr().out)
    documented = json.loads(
        (Path(__file__).parents[1] / "docs" / f"{what}.schema.json").read_text()
    )
    assert printed == documented, (
        "regenerate with: quantpatch schema {what} > docs/{what}.schema.json"
    )
