"""The CUDA paths, checked against the CPU ones: fake quantization, straight-through gradients,
seeded training, a patch attack and a whole tiny study on the GPU.

They run only where torch sees a CUDA device (CI has none, so they skip there); the device
check of a session with a GPU runs this file (`pytest tests/test_cuda.py`) and records the
figures in benchmarks/README.md.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantpatch.attacks import create_attack
from quantpatch.metrics import attack_success
from quantpatch.models import TrainConfig, create_model, predict_logits, train_model
from quantpatch.models.determinism import deterministic_training
from quantpatch.quant import QuantSpec, build_quantized

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def w4a4(mnist_lenet_fp32):
    """LeNet at w4a4 PTQ, calibrated on the CPU (the same scales then run on either device)."""
    ds, model = mnist_lenet_fp32
    spec = QuantSpec.parse("w4a4-ptq")
    quantized = build_quantized(model, spec, ds.train, device=CPU, progress=False)
    return ds, quantized.eval()


def test_fake_quant_forward_agrees_between_cpu_and_cuda(w4a4) -> None:
    ds, model = w4a4
    images = ds.test.images[:1000]
    on_cpu = predict_logits(model, images, CPU)
    on_gpu = predict_logits(copy.deepcopy(model), images, CUDA)
    agree = (on_cpu.argmax(1) == on_gpu.argmax(1)).float().mean().item()
    # an activation a hair from a rounding boundary may land on the other level on the GPU;
    # that moves a logit by one step, rarely the decision
    assert agree >= 0.99, agree
    relative = (on_cpu - on_gpu).norm(dim=1) / on_cpu.norm(dim=1)
    assert relative.median().item() < 1e-3, relative.median()


def _input_gradient(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    x = images.clone().requires_grad_(True)
    F.cross_entropy(model(x), labels).backward()
    return x.grad.flatten(1)


def test_straight_through_gradients_agree_between_cpu_and_cuda(w4a4) -> None:
    ds, model = w4a4
    images, labels = ds.test.images[:256], ds.test.labels[:256]
    on_cpu = _input_gradient(model.to(CPU), images, labels)
    on_gpu = _input_gradient(copy.deepcopy(model).to(CUDA), images.to(CUDA), labels.to(CUDA))
    assert on_gpu.abs().sum() > 0
    cosine = F.cosine_similarity(on_cpu, on_gpu.cpu(), dim=1)
    assert cosine.median().item() > 0.99, cosine.median()


def _train_on_cuda(ds, seed: int) -> torch.nn.Module:
    with deterministic_training(seed=seed, device=CUDA):
        model = create_model(
            "lenet", in_channels=1, num_classes=10, image_size=28, mean=ds.mean, std=ds.std
        )
        config = TrainConfig(epochs=2, lr=0.05, batch_size=64, seed=seed)
        train_model(model, ds.train, config, CUDA, progress=False)
    return model.eval()


def test_seeded_training_on_cuda_learns_and_repeats(mnist_lenet_fp32) -> None:
    ds, _ = mnist_lenet_fp32
    first, second = _train_on_cuda(ds, seed=5), _train_on_cuda(ds, seed=5)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    predicted = predict_logits(first, ds.test.images, CUDA).argmax(1)
    assert (predicted == ds.test.labels).float().mean().item() >= 0.9


def test_patch_pgd_on_cuda_fools_the_quantized_model(w4a4) -> None:
    ds, model = w4a4
    model = copy.deepcopy(model).to(CUDA)
    x, y = ds.test.images[:64], ds.test.labels[:64]
    attack = create_attack(
        "patch-pgd", patch_size=8, steps=40, restarts=2, early_stop=True, progress=False
    )
    adversarial = attack.perturb([model], x, y, CUDA)
    adversarial = adversarial.cpu()
    changed = (adversarial != x).flatten(2).any(1).sum(1)
    assert changed.max() <= 64  # an 8x8 patch, nothing else
    clean = predict_logits(model, x, CUDA).argmax(1)
    rate = attack_success(clean, predict_logits(model, adversarial, CUDA).argmax(1), y)
    assert rate.n >= 55 and rate.rate >= 0.9, rate


def test_tiny_study_runs_on_cuda_and_records_the_gpu(tmp_path: Path, tiny_study_settings) -> None:
    from quantpatch.report import build_report
    from quantpatch.study import load_study, run_study

    settings = {**tiny_study_settings, "device": "cuda"}
    config = load_study(None, **settings, cache_dir=tmp_path / "cache")
    run_study(config, tmp_path / "run", progress=False)
    build_report(tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    numerics = json.dumps(results)
    assert torch.cuda.get_device_name(0) in numerics
    universal = [c for c in results["cells"] if c["attack"] == "universal"]
    assert universal and all(c["n"] > 0 for c in universal)
    fp32 = next(m for m in results["models"] if m["name"] == "lenet/fp32")
    assert fp32["clean"]["rate"] >= 0.9, fp32
