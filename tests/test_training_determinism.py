"""Training numerics: pinned threads make weights independent of the process's thread settings."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quantpatch.errors import ConfigError
from quantpatch.models import TRAINING_THREADS, deterministic_training, training_numerics

SRC = Path(__file__).resolve().parent.parent / "src"

# Trains LeNet for 3 steps on seeded random images (threads = argv[1]: an int or "none")
# after the process set its own thread count (argv[2]); prints a digest of the weights.
_TRAIN = """
import hashlib, sys, torch
from quantpatch.data import Split
from quantpatch.models import TrainConfig, create_model, train_model
torch.set_num_threads(int(sys.argv[2]))
g = torch.Generator().manual_seed(0)
split = Split(torch.rand(96, 1, 28, 28, generator=g), torch.randint(10, (96,), generator=g))
torch.manual_seed(0)
model = create_model("lenet", in_channels=1, num_classes=10, image_size=28)
threads = None if sys.argv[1] == "none" else int(sys.argv[1])
train_model(model, split, TrainConfig(epochs=1, batch_size=32), "cpu", progress=False,
            threads=threads)
digest = hashlib.sha256()
for tensor in model.state_dict().values():
    digest.update(tensor.contiguous().numpy().tobytes())
print(digest.hexdigest())
"""


def _train_in_subprocesses(*settings: tuple[str, int]) -> list[str]:
    """Weight digests of one training per (threads, process threads), run side by side, each
    in a fresh interpreter whose OMP_NUM_THREADS is its process thread count."""
    procs = []
    for threads, process_threads in settings:
        env = {**os.environ, "OMP_NUM_THREADS": str(process_threads), "PYTHONPATH": str(SRC)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _TRAIN, threads, str(process_threads)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    digests = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        digests.append(out.strip())
    return digests


def test_pinned_training_gives_the_same_weights_whatever_the_process_threads() -> None:
    """Pinned to ``TRAINING_THREADS`` (2), a 1-thread and a 2-thread process train the same
    weights; unpinned, the 1-thread process trains other weights (else the check is blind)."""
    pinned_one, pinned_two, free_one = _train_in_subprocesses(
        (str(TRAINING_THREADS), 1), (str(TRAINING_THREADS), 2), ("none", 1)
    )
    assert pinned_one == pinned_two
    if free_one == pinned_one:
        pytest.skip("on this machine the thread count does not change these weights")


def test_deterministic_training_restores_the_callers_settings_and_streams() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    with deterministic_training(seed=0, threads=1):
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        inside = torch.rand(3)
    assert torch.get_num_threads() == 2
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.rand(3), expected[0])  # training did not move the caller's draws
    assert (random.random(), np.random.rand()) == expected[1:]
    with deterministic_training(seed=0, threads=1):
        assert torch.equal(torch.rand(3), inside)  # and the seed fixes the draws inside


def test_deterministic_training_restores_settings_after_an_error() -> None:
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="boom"), deterministic_training(threads=1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ConfigError, match="threads"), deterministic_training(threads=0):
        pass


def test_training_numerics_records_what_decides_the_weights() -> None:
    record = training_numerics("cpu")
    assert record["torch"] == torch.__version__
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["training_threads"] == TRAINING_THREADS
    assert record["process_threads"] == torch.get_num_threads()
    assert record["deterministic_algorithms"] is True
    assert json.loads(json.dumps(record)) == record
