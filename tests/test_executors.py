"""Choosing an executor: local by default, Ray refused in one line when absent, never part of
the study's identity; and the scaling estimate from recorded cell times."""

from __future__ import annotations

import importlib.util

import pytest

from quantpatch.errors import ConfigError
from quantpatch.results import Timings
from quantpatch.study import load_study
from quantpatch.study.run.executors import cell_seconds, create_executor, estimate_scaling


def test_local_is_the_default_and_needs_no_ray() -> None:
    config = load_study()
    assert config.executor == "local"
    assert create_executor(config) is None


def test_ray_without_ray_installed_is_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"needs Ray: pip install 'quantpatch\[ray\]'"):
        create_executor(load_study(executor="ray"))


def test_address_without_ray_executor_is_refused() -> None:
    with pytest.raises(ConfigError, match="executor is local"):
        create_executor(load_study(ray_address="auto"))


def test_cli_refuses_ray_without_ray_before_any_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture
) -> None:
    from quantpatch.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    out = tmp_path / "run"
    assert main(["run", "--executor", "ray", "--out", str(out), "--quiet"]) == 2
    assert "needs Ray" in capsys.readouterr().err
    assert not out.exists()


def test_cli_address_reaches_the_study(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from quantpatch.cli.main import main

    assert main(["run", "--address", "auto", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "add --executor ray" in capsys.readouterr().err


def test_executor_is_not_part_of_the_study() -> None:
    """A study resumed under another executor reuses its run folder."""
    local = load_study()
    ray = load_study(executor="ray", ray_address="127.0.0.1:6379")
    assert local.fingerprint()[0] == ray.fingerprint()[0]


class _Record:
    def __init__(self, cell: str, timings: Timings) -> None:
        self.cell, self.timings = cell, timings


def test_scaling_estimate_bounds_the_makespan() -> None:
    wall = [Timings(fit_s=0, perturb_s=0, eval_s=0, wall_s=s) for s in (4.0, 2.0, 2.0)]
    records = [_Record(f"c{i}", t) for i, t in enumerate(wall)]
    records.append(_Record("c0", wall[0]))  # a cell has one record per target
    one, two = estimate_scaling(records, 1, serial_s=1.0), estimate_scaling(records, 2, 1.0)
    assert (one.lower_s, one.upper_s) == (9.0, 13.0)
    assert (two.lower_s, two.upper_s) == (5.0, 9.0)
    assert estimate_scaling(records, 8).lower_s == 4.0  # the longest cell bounds it
    with pytest.raises(ValueError):
        estimate_scaling(records, 0)


def test_cell_seconds_of_older_records_sum_their_parts() -> None:
    t = Timings(fit_s=1.0, perturb_s=2.0, eval_s=0.5)
    assert cell_seconds([_Record("a", t), _Record("a", t)]) == {"a": 4.0}
