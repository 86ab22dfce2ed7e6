"""The command line: registries, bad input -> one stderr line and exit code 2."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from quantpatch.cli import main


def test_list_models_and_attacks(capsys) -> None:
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "lenet" in out and "resnet20" in out and "tv:<name>" in out and "timm:<name>" in out
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    for name in ("universal", "random", "lavan", "patch-pgd", "multibit", "pgd-linf", "sparse-rs"):
        assert name in out
    assert main(["list", "recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("random-precision", "patch-at", "disalign"))


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


def test_train_out_and_a_damaged_cached_checkpoint(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    args = ["train", "--model", "lenet", "--limit", "300", "--epochs", "1",
            "--cache-dir", str(cache), "--device", "cpu"]  # fmt: skip
    out = tmp_path / "copies" / "lenet.safetensors"
    old_umask = os.umask(0o022)
    try:
        assert main([*args, "--out", str(out)]) == 0
    finally:
        os.umask(old_umask)
    assert f"checkpoint: {out}" in capsys.readouterr().out
    checkpoint = next((cache / "models").glob("*.safetensors"))
    assert out.read_bytes() == checkpoint.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert [p.name for p in out.parent.iterdir()] == ["lenet.safetensors"]  # no temp left
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert main(args) == 0  # a damaged cache entry is reported in one line and rebuilt
    captured = capsys.readouterr()
    assert len([line for line in captured.err.splitlines() if "damaged cache entry" in line]) == 1
    assert out.read_bytes() == checkpoint.read_bytes() != b""


def test_corrupt_user_checkpoint_is_a_corrupt_file_error(tmp_path: Path) -> None:
    from quantpatch.errors import CorruptFileError
    from quantpatch.models import create_model

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 100)
    with pytest.raises(CorruptFileError, match="corrupt"):
        create_model("lenet", in_channels=1, num_classes=10, image_size=28, weights=weights)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--model", "lenet", "--epochs", "-5"], "--epochs: must be at least 1"),
        (["run", "--limit", "ten"], "--limit: expected an integer, got 'ten'"),
        (["run", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["list"], "required: what"),
    ],
)
def test_usage_errors_are_one_line_with_a_help_hint(capsys, args, needle) -> None:
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantpatch: error: ")
    assert needle in lines[0] and f"(see 'quantpatch {args[0]} --help')" in lines[0]
    assert captured.out == ""  # no usage dump either


def test_help_and_version_still_exit_0(capsys) -> None:
    for args in (["--help"], ["train", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 0
    assert "--epochs" in capsys.readouterr().out


def test_os_errors_while_writing_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import quantpatch.report

    def disk_full(run_dir, out=None):
        raise OSError(28, "No space left on device", str(tmp_path / "report.html"))

    monkeypatch.setattr(quantpatch.report, "build_report", disk_full)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"quantpatch: error: {tmp_path / 'report.html'}: No space left on device\n"


def test_train_checks_its_output_before_training(tmp_path: Path, capsys, monkeypatch) -> None:
    import quantpatch.study

    def trained(**kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(quantpatch.study, "train_one", trained)
    (tmp_path / "taken").write_text("a file, not a folder")
    assert main(["train", "--model", "lenet", "--out", str(tmp_path / "taken" / "m.st")]) == 2
    assert "checkpoint file" in capsys.readouterr().err


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
def test_shipped_schemas_are_current(what: str, capsys) -> None:
    import json

    from quantpatch.schemas import generate

    assert main(["schema", what]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == generate(what), "regenerate with: python -m quantpatch.schemas"


@pytest.mark.parametrize("value", ["0", "101"])
def test_replicates_out_of_range_exit_2_in_one_line(value: str, tmp_path: Path, capsys) -> None:
    assert main(["run", "--replicates", value, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "replicates" in err[0]
    assert not (tmp_path / "run").exists()


def test_list_deployments(capsys) -> None:
    assert main(["list", "deployments"]) == 0
    out = capsys.readouterr().out
    assert "ort-int8" in out and "openvino-int8" in out


@pytest.mark.parametrize(
    "argv, printed",
    [
        (["--help"], "usage: quantpatch"),
        (["run", "--help"], "usage: quantpatch"),
        (["compare", "--help"], "usage: quantpatch"),
        (["schema", "study"], '"title": "StudyConfig"'),
        (["schema", "results"], '"$defs"'),
    ],
)
def test_help_and_schema_do_not_import_torch(argv, printed) -> None:
    """Help and schemas print before any heavy import (torch alone costs seconds of CPU)."""
    code = ("import sys\nfrom quantpatch.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert printed in done.stdout


@pytest.mark.parametrize("count", ["0", "101", "two"])
def test_impossible_replicates_are_refused_before_torch_loads(count: str) -> None:
    """The count is checked by the parser, so the refusal costs no torch import."""
    code = ("import sys\nfrom quantpatch.cli import main\nrc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nsys.exit(rc)\n")  # fmt: skip
    argv = ["run", "--replicates", count]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "--replicates" in done.stderr


def test_validating_a_config_loads_neither_the_runner_nor_the_report() -> None:
    """A refused study file is answered after the settings load, not the whole stack."""
    code = ("import sys\nfrom quantpatch.study.settings.config import load_study\n"
            "print(' '.join(sorted(sys.modules)))\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = done.stdout.split()
    for heavy in ("quantpatch.study.run", "quantpatch.report", "matplotlib"):
        assert not any(m.startswith(heavy) for m in loaded), heavy
