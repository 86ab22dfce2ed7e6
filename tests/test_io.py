"""Tests for ``quantpatch._io`` (atomic writes, output-path checks, bounded JSON) and
``quantpatch._yaml`` (the study-file loader); the refusals are also in test_bad_inputs.py."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from quantpatch._io import (
    atomic_path,
    read_json,
    require_writable_dir,
    require_writable_file,
    write_json_atomic,
    write_text_atomic,
)
from quantpatch._yaml import MAX_VALUES, load_yaml_mapping
from quantpatch.errors import ConfigError, CorruptFileError, OutputPathError, QuantpatchError


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    write_text_atomic(tmp_path / "a.txt", "hello")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert _files(tmp_path) == {"out.json"}  # the temp file is gone too


def test_atomic_path_creates_parent_folders(tmp_path):
    write_text_atomic(tmp_path / "a" / "b" / "c.txt", "x")
    assert (tmp_path / "a" / "b" / "c.txt").read_text() == "x"


def test_atomic_temp_names_are_hidden_and_distinct(tmp_path):
    with atomic_path(tmp_path / "f.bin") as one, atomic_path(tmp_path / "f.bin") as two:
        assert one != two
        assert one.name.startswith(".f.bin.") and one.name.endswith(".tmp")
        one.write_bytes(b"1")
        two.write_bytes(b"2")
    assert (tmp_path / "f.bin").read_bytes() == b"1"  # the outer block renames last
    assert _files(tmp_path) == {"f.bin"}


# --------------------------------------------------------------------------- output paths


def test_writable_dir_accepts_new_and_existing_folders_and_creates_nothing(tmp_path):
    assert require_writable_dir(tmp_path, "run folder") == tmp_path
    assert require_writable_dir(tmp_path / "new" / "deeper", "run folder") == (
        tmp_path / "new" / "deeper"
    )
    assert _files(tmp_path) == set()  # the probe file is removed


def test_writable_dir_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert require_writable_dir("~/runs", "run folder") == tmp_path / "runs"


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda t: t / "file.txt", "is not a folder"),  # an existing file
        (lambda t: t / "file.txt" / "sub", "is not a folder"),  # under a file
        (lambda t: Path("/proc/quantpatch-run"), "/proc is a kernel pseudo-filesystem"),
        (lambda t: Path("/sys/kernel/x"), "/sys is a kernel pseudo-filesystem"),
    ],
    ids=["existing-file", "under-a-file", "proc", "sys"],
)
def test_writable_dir_refusals(tmp_path, make, needle):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputPathError, match=needle) as err:
        require_writable_dir(make(tmp_path), "run folder")
    message = str(err.value)
    assert message.startswith("run folder ") and "\n" not in message
    assert isinstance(err.value, QuantpatchError) and isinstance(err.value, OSError)
    assert _files(tmp_path) == {"file.txt"}


def test_writable_dir_probes_the_nearest_existing_ancestor(tmp_path, monkeypatch):
    """Permission bits do not tell (root ignores them): the check tries to create a file."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputPathError, match=f"cannot create files in {tmp_path}.*denied"):
        require_writable_dir(tmp_path / "a" / "b", "cache folder")


def test_writable_file(tmp_path):
    (tmp_path / "old.html").write_text("old")
    assert require_writable_file(tmp_path / "old.html", "report") == tmp_path / "old.html"
    assert require_writable_file(tmp_path / "new" / "r.html", "report") == (
        tmp_path / "new" / "r.html"
    )
    with pytest.raises(OutputPathError, match="is a folder"):
        require_writable_file(tmp_path, "report")
    with pytest.raises(OutputPathError, match="not a regular file"):
        require_writable_file("/dev/null", "report")
    with pytest.raises(OutputPathError, match="/proc"):
        require_writable_file("/proc/r.html", "report")
    with pytest.raises(OutputPathError, match="old.html is not a folder"):
        require_writable_file(tmp_path / "old.html" / "r.html", "report")
    assert _files(tmp_path) == {"old.html"}


# --------------------------------------------------------------------------- JSON


def test_read_json_round_trip_and_refusals(tmp_path):
    write_json_atomic(tmp_path / "ok.json", {"a": [1, 2]})
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptFileError, match="deep.json.*nested too deeply"):
        read_json(tmp_path / "deep.json")
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(CorruptFileError, match="latin.json"):
        read_json(tmp_path / "latin.json")


def test_read_json_size_limit(tmp_path, monkeypatch):
    import quantpatch._io as io_module

    monkeypatch.setattr(io_module, "MAX_JSON_BYTES", 10)
    (tmp_path / "big.json").write_text('{"a": "0123456789"}')
    with pytest.raises(CorruptFileError, match="big.json: larger than"):
        read_json(tmp_path / "big.json")


# --------------------------------------------------------------------------- YAML


def _yaml(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "study.yaml"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_yaml_mapping_matches_safe_load(tmp_path):
    import yaml

    text = "name: x\nmodels: [lenet, resnet20]\ntrain: {epochs: 3, lr: 0.05}\nlimit: null\n"
    assert load_yaml_mapping(_yaml(tmp_path, text)) == yaml.safe_load(text)


def test_yaml_explicit_empty_mapping_is_allowed(tmp_path):
    assert load_yaml_mapping(_yaml(tmp_path, "{}\n")) == {}


def test_yaml_bom_is_accepted(tmp_path):
    assert load_yaml_mapping(_yaml(tmp_path, "\ufeffname: x\n")) == {"name": "x"}


def test_yaml_anchors_aliases_and_merge_keys_still_work(tmp_path):
    text = (
        "base: &base {epochs: 1, lr: 0.1}\n"
        "train: *base\n"
        "qat: {<<: *base, epochs: 2}\n"  # a merge key may be overridden
        "train_overrides: {lenet: *base, resnet20: *base}\n"
    )
    data = load_yaml_mapping(_yaml(tmp_path, text))
    assert data["train"] == {"epochs": 1, "lr": 0.1}
    assert data["qat"] == {"epochs": 2, "lr": 0.1}
    assert data["train_overrides"]["resnet20"] == data["base"]


def test_yaml_equal_keys_in_different_mappings_are_fine(tmp_path):
    data = load_yaml_mapping(_yaml(tmp_path, "train: {epochs: 1}\nqat: {epochs: 1}\n"))
    assert data == {"train": {"epochs": 1}, "qat": {"epochs": 1}}


def test_yaml_expansion_limit_is_exact(tmp_path):
    """N aliases to an N-item list count as N * (N + 1) values: ~90,600 for N = 300 (allowed),
    ~102,700 for N = 320 (refused), though memory holds one list either way."""
    n = 300
    items = ", ".join(["0"] * n)
    refs = ", ".join(["*a"] * n)
    data = load_yaml_mapping(_yaml(tmp_path, f"a: &a [{items}]\nb: [{refs}]\n"))
    assert len(data["b"]) == n and data["b"][0] is data["a"]  # never expanded in memory
    n = 320
    items = ", ".join(["0"] * n)
    refs = ", ".join(["*a"] * n)
    with pytest.raises(ConfigError, match=f"more than {MAX_VALUES} values"):
        load_yaml_mapping(_yaml(tmp_path, f"a: &a [{items}]\nb: [{refs}]\n"))
