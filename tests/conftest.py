"""Shared fixtures: a tiny, fast study configuration for end-to-end tests."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_study_settings() -> dict:
    """A study small enough for CI (lenet, two precisions, few steps) that still runs every
    stage: training, QAT, ORT int8, universal + random patches, and all analyses."""
    return {
        "name": "tiny",
        "limit": 2000,
        "models": ["lenet"],
        "precisions": ["fp32", "w8a8", "w2a2"],
        "attacks": [
            {"name": "universal", "params": {"steps": 40, "batch_size": 64}},
            {"name": "random"},
        ],
        "patch_sizes": [8],
        "n_eval": 200,
        "train": {"epochs": 3, "lr": 0.05, "batch_size": 64},
        "qat": {"epochs": 1, "lr": 0.01},
        "qat_overrides": {},  # one short QAT for every precision keeps the suite fast
        "analyses": {
            "n_images": 32,
            "spatial_images": 16,
            "spatial_stride": 4,
            "size_fractions": [0.04, 0.1],
            "strength_bits": [2, 8],
        },
        "device": "cpu",
    }


LENET_FP32_TRAIN = {"epochs": 3, "lr": 0.05, "batch_size": 64, "seed": 0}


@pytest.fixture(scope="session")
def mnist_lenet_fp32():
    """(mnist5k, LeNet trained 3 epochs, eval mode): shared by the quant and ONNX tests, which
    only ever quantize or export copies of it."""
    from quantpatch.data import load_dataset
    from quantpatch.models import TrainConfig, create_model, train_model

    torch.manual_seed(0)
    ds = load_dataset("mnist5k")
    model = create_model(
        "lenet", in_channels=1, num_classes=10, image_size=28, mean=ds.mean, std=ds.std
    )
    train_model(model, ds.train, TrainConfig(**LENET_FP32_TRAIN), "cpu", progress=False)
    return ds, model.eval()


@pytest.fixture(scope="session")
def lab():
    """A LeNet trained for a few seconds on 512 digits, plus clean predictions on 512 more:
    the attack tests' model (trained once, shared by every attack test file)."""
    from quantpatch.data import load_dataset
    from quantpatch.models import TrainConfig, create_model, predict_logits, train_model

    data = load_dataset("mnist5k", limit=512)
    torch.manual_seed(0)  # the weight init
    model = create_model(
        "lenet", in_channels=1, num_classes=10, image_size=28, mean=data.mean, std=data.std
    )
    config = TrainConfig(epochs=4, lr=0.05, batch_size=8, weight_decay=0.0, seed=0)
    train_model(model, data.train, config, "cpu", progress=False)
    images, labels = data.test.images, data.test.labels
    clean = predict_logits(model, images, "cpu").argmax(1)
    assert (clean == labels).float().mean() > 0.8  # it learned something
    return SimpleNamespace(model=model, train=data.train, images=images, labels=labels, clean=clean)
