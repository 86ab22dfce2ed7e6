"""A study on a real (local) Ray cluster, a head and a second worker node, gives the same
rates as on one machine, writes the same cell files, and a rerun reuses every finished cell."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import quantpatch
from quantpatch.study import load_study, run_study

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'quantpatch[ray]')")
cluster_utils = pytest.importorskip("ray.cluster_utils")

NODE_CPUS = 1
"""Each node offers one CPU: two workers in all, as small as a cluster gets."""

OBJECT_STORE_BYTES = 100 * 1024**2
"""Per node, near Ray's minimum: the tasks pass only settings and records (kilobytes), and a
CI machine's /dev/shm is small."""


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A head node plus a second worker node on 127.0.0.1; torn down however the test ends."""
    source = str(Path(quantpatch.__file__).resolve().parents[1])  # workers import this code
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (source, saved) if p)
    node = {"num_cpus": NODE_CPUS, "object_store_memory": OBJECT_STORE_BYTES}
    cluster = cluster_utils.Cluster(
        initialize_head=True, head_node_args={**node, "include_dashboard": False}
    )
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _settings(tiny: dict) -> dict:
    return {
        **tiny,
        "limit": 600,
        "n_eval": 50,
        "precisions": ["fp32", "w8a8"],
        "deployments": [],
        "controls": False,
        "train": {"epochs": 1, "lr": 0.05, "batch_size": 64},
        "attacks": [
            {
                "name": "universal",
                "params": {"steps": 5, "batch_size": 32},
                "sources": ["fp32", "fp32-indep", "w8a8"],
            },  # fp32-indep: trained by its own task
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


def _rates(results: Path) -> dict[str, tuple]:
    cells = json.loads(results.read_text())["cells"]
    return {f"{c['cell']}>{c['target']}": (c["successes"], c["n"], c["rate"]) for c in cells}


def _cell_files(run: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (run / "cells").glob("*.json")}


@pytest.mark.slow
def test_ray_study_matches_local_and_resumes(
    tmp_path: Path, tiny_study_settings: dict, ray_cluster: str
) -> None:
    settings = _settings(tiny_study_settings)
    local = run_study(
        load_study(**settings, cache_dir=tmp_path / "cache-local"), tmp_path / "local",
        progress=False,
    )  # fmt: skip
    config = load_study(
        **settings, executor="ray", ray_address=ray_cluster, cache_dir=tmp_path / "cache-ray"
    )
    run = tmp_path / "ray"
    remote = run_study(config, run, progress=False)

    rates = _rates(remote)
    assert rates == _rates(local)  # every rate of every cell and target, trained apart
    records = json.loads(remote.read_text())["cells"]
    assert {r["timings"]["executor"] for r in records} == {"ray"}
    assert all(r["timings"]["node"] and r["timings"]["wall_s"] > 0 for r in records)
    local_files = sorted(p.name for p in (tmp_path / "local" / "cells").glob("*.json"))
    assert sorted(_cell_files(run)) == local_files  # the same cells, by id and key

    before = _cell_files(run)
    assert _rates(run_study(config, run, progress=False)) == rates
    assert _cell_files(run) == before  # every finished cell reused, none rewritten


@pytest.mark.parametrize(
    ("gpus", "device", "asked"),
    [(2.0, "auto", {"num_gpus": 1}), (2.0, "cpu", {"num_cpus": 1}), (0, "auto", {"num_cpus": 1})],
)
def test_a_task_asks_for_one_gpu_where_the_cluster_has_them(
    monkeypatch: pytest.MonkeyPatch, gpus: float, device: str, asked: dict
) -> None:
    from quantpatch.study.run import ray_executor

    monkeypatch.setattr(ray_executor.ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": gpus})
    options = ray_executor._task_options(load_study(device=device))
    assert options == {**asked, "max_retries": ray_executor.TASK_RETRIES}
