"""Tests for quantpatch.models: every registered network, training, prediction, checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from quantpatch.data import load_dataset
from quantpatch.data._types import Split
from quantpatch.errors import CorruptFileError, DataNotFoundError, ShapeError, UnknownNameError
from quantpatch.metrics import Rate
from quantpatch.models import (
    MODELS,
    Normalize,
    NormalizedClassifier,
    TrainConfig,
    create_model,
    evaluate_accuracy,
    fast_frozen_copy,
    load_checkpoint,
    model_choices,
    predict_logits,
    save_checkpoint,
    train_model,
)

CPU = torch.device("cpu")
ZOO = MODELS.names()


def _lenet(image_size: int = 28) -> NormalizedClassifier:
    torch.manual_seed(0)
    return create_model("lenet", in_channels=1, num_classes=10, image_size=image_size)


def _tiny_split(n: int = 128, size: int = 12) -> Split:
    """Cheap learnable data for tests about the training loop itself."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    prototypes = torch.rand(10, 1, size, size, generator=gen).round()  # one binary pattern each
    noise = torch.rand(n, 1, size, size, generator=gen)
    return Split(0.7 * prototypes[labels] + 0.3 * noise, labels)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def trained_lenet(mnist):
    """LeNet trained 2 epochs on mnist5k; returns (model, seconds per epoch)."""
    torch.manual_seed(0)
    model = create_model(
        "lenet", in_channels=1, num_classes=10, image_size=28, mean=mnist.mean, std=mnist.std
    )
    start = time.perf_counter()
    train_model(model, mnist.train, TrainConfig(epochs=2, seed=0), CPU, progress=False)
    return model, (time.perf_counter() - start) / 2


def test_zoo_has_the_documented_families():
    assert {"lenet", "resnet20", "resnet56", "vgg11_bn", "mobilenetv2", "vit_tiny"} <= set(ZOO)
    names = [name for name, _ in model_choices()]
    assert "tv:<name>" in names
    assert all(help_text for _, help_text in model_choices())


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_forward_shape(name: str, channels: int, size: int):
    torch.manual_seed(0)
    model = create_model(name, in_channels=channels, num_classes=10, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ZOO)
def test_backward_gives_input_and_weight_gradients(name: str):
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=7, image_size=28)
    images = torch.rand(2, 1, 28, 28, requires_grad=True)
    nn.functional.cross_entropy(model(images), torch.tensor([0, 5])).backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ZOO)
def test_uses_only_quantizable_layers_and_no_inplace_relu(name: str):
    model = create_model(name, in_channels=3, num_classes=10, image_size=32)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in leaves)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in leaves)


@pytest.mark.parametrize("name", ZOO)
def test_too_small_image_is_a_shape_error(name: str):
    with pytest.raises(ShapeError, match="image_size"):
        create_model(name, in_channels=1, num_classes=10, image_size=4)


def test_bad_arguments_raise_specific_errors():
    with pytest.raises(ShapeError, match="divisible"):
        create_model("vit_tiny", in_channels=1, num_classes=10, image_size=30)
    with pytest.raises(ShapeError, match="num_classes"):
        create_model("lenet", in_channels=1, num_classes=1, image_size=28)
    with pytest.raises(ShapeError, match="in_channels"):
        create_model("resnet20", in_channels=0, num_classes=10, image_size=28)


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownNameError, match="lenet"):
        create_model("resnet9000", in_channels=1, num_classes=10, image_size=28)
    with pytest.raises(UnknownNameError, match="torchvision"):
        create_model("tv:not_a_net", in_channels=3, num_classes=10, image_size=32)


@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_passthrough(channels: int):
    torch.manual_seed(0)
    model = create_model("tv:resnet18", in_channels=channels, num_classes=10, image_size=32)
    with torch.no_grad():
        assert model.eval()(torch.rand(2, channels, 32, 32)).shape == (2, 10)


def test_torchvision_bare_weights_load_for_grayscale_input(tmp_path: Path):
    torch.manual_seed(0)
    rgb = create_model("tv:resnet18", in_channels=3, num_classes=10, image_size=32)
    path = tmp_path / "resnet18.pth"
    torch.save(rgb.net.state_dict(), path)  # a bare torchvision state dict
    gray = create_model("tv:resnet18", in_channels=1, num_classes=10, image_size=32, weights=path)
    images = torch.rand(2, 1, 32, 32)
    expected = predict_logits(rgb, images.expand(-1, 3, -1, -1), CPU)
    assert torch.allclose(predict_logits(gray, images, CPU), expected, atol=1e-5)


def test_torchvision_image_too_small_is_a_shape_error():
    with pytest.raises(ShapeError, match="tv:vit_b_16"):
        create_model("tv:vit_b_16", in_channels=3, num_classes=10, image_size=32)


def test_normalize_is_per_channel_and_saved():
    norm = Normalize((0.1, 0.2, 0.3), (0.5, 0.5, 0.25))
    out = norm(torch.ones(1, 3, 2, 2))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.8, 1.6, 2.8]))
    assert set(norm.state_dict()) == {"mean", "std"}
    model = create_model("lenet", in_channels=3, num_classes=10, image_size=28, mean=0.4, std=0.2)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.4] * 3)
    with pytest.raises(ShapeError, match="std has 2 values"):
        create_model("lenet", in_channels=3, num_classes=10, image_size=28, std=(0.2, 0.3))
    with pytest.raises(ValueError, match="positive"):
        Normalize(0.5, 0.0)


def test_lenet_trains_to_90_percent_on_mnist5k(trained_lenet, mnist, capsys):
    model, seconds_per_epoch = trained_lenet
    acc = evaluate_accuracy(model, mnist.test, CPU)
    assert isinstance(acc, Rate)
    assert acc.n == len(mnist.test) == 1000
    assert acc.rate >= 0.90, f"lenet reached only {acc}"
    assert not model.training
    with capsys.disabled():
        print(f"\n[lenet mnist5k] {seconds_per_epoch:.1f} s/epoch on CPU, test accuracy {acc}")
    assert seconds_per_epoch < 120  # a few seconds normally; catches pathological slowdowns


def test_training_is_deterministic_for_a_seed():
    small = _tiny_split()
    config = TrainConfig(epochs=1, batch_size=32, seed=3)
    a = train_model(_lenet(12), small, config, CPU, progress=False)
    b = train_model(_lenet(12), small, config, CPU, progress=False)
    c = train_model(_lenet(12), small, config.model_copy(update={"seed": 4}), CPU, progress=False)
    pairs = zip(a.state_dict().items(), b.state_dict().values(), strict=True)
    assert all(torch.equal(pa, pb) for (_, pa), pb in pairs)
    pairs_c = zip(a.parameters(), c.parameters(), strict=True)
    assert not all(torch.equal(pa, pc) for pa, pc in pairs_c)


def test_training_reduces_loss_on_learnable_data():
    small = _tiny_split()
    model = _lenet(12)
    before = nn.functional.cross_entropy(predict_logits(model, small.images, CPU), small.labels)
    train_model(model, small, TrainConfig(epochs=5, batch_size=16), CPU, progress=False)
    after = nn.functional.cross_entropy(predict_logits(model, small.images, CPU), small.labels)
    assert after < 0.2 * before


class _ScaledLogits(nn.Module):
    """Stand-in for a quantized model: a net plus an extra learnable scalar."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def test_training_optimises_extra_parameters_and_param_groups():
    small = _tiny_split(64)
    model = _ScaledLogits(_lenet(12))
    train_model(model, small, TrainConfig(epochs=1, batch_size=32), CPU, progress=False)
    assert model.scale.item() != 1.0
    frozen = _ScaledLogits(_lenet(12))
    before = [p.detach().clone() for p in frozen.net.parameters()]
    groups = [{"params": [frozen.scale], "lr": 0.01}]
    train_model(
        frozen, small, TrainConfig(epochs=1, batch_size=32), CPU, False, param_groups=groups
    )
    assert frozen.scale.item() != 1.0
    assert all(torch.equal(b, p) for b, p in zip(before, frozen.net.parameters(), strict=True))


def test_train_config_is_frozen_and_validated():
    config = TrainConfig()
    assert (config.epochs, config.lr, config.batch_size) == (10, 0.05, 128)
    assert hash(config) == hash(TrainConfig())
    with pytest.raises(ValidationError):
        config.lr = 0.1  # type: ignore[misc]
    with pytest.raises(ValueError):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError):
        TrainConfig(batch_sise=3)  # typo must not pass silently
    with pytest.raises(ShapeError):
        train_model(
            _lenet(),
            Split(torch.rand(1, 1, 28, 28), torch.zeros(1, dtype=torch.long)),
            config,
            CPU,
            progress=False,
        )


def test_predict_logits_is_batched_cpu_float_and_restores_mode(mnist):
    model = _lenet().train()
    images = mnist.test.images[:50]
    whole = predict_logits(model, images, CPU)
    pieces = predict_logits(model, images, CPU, batch_size=7)
    assert whole.shape == (50, 10) and whole.dtype == torch.float32 and whole.device == CPU
    assert torch.allclose(whole, pieces, atol=1e-5)
    assert model.training  # mode restored
    assert (whole * 2).requires_grad is False  # a normal tensor, usable outside inference mode
    as_callable = predict_logits(lambda x: model.eval()(x), images, CPU, batch_size=16)
    assert torch.allclose(as_callable, whole, atol=1e-5)
    assert predict_logits(model, images[:0], CPU).shape == (0, 10)
    with pytest.raises(ShapeError):
        predict_logits(model, images[0], CPU)


def test_checkpoint_round_trip_gives_identical_logits(trained_lenet, mnist, tmp_path: Path):
    model, _ = trained_lenet
    path = tmp_path / "lenet.safetensors"
    save_checkpoint(path, model, {"model": "lenet", "epochs": 2, "acc": [0.9, 1000]})
    fresh = create_model("lenet", in_channels=1, num_classes=10, image_size=28)
    meta = load_checkpoint(path, fresh)
    assert meta == {"model": "lenet", "epochs": 2, "acc": [0.9, 1000]}
    images = mnist.test.images[:64]
    assert torch.equal(predict_logits(model, images, CPU), predict_logits(fresh, images, CPU))
    assert torch.equal(fresh.normalize.mean, model.normalize.mean)  # stats travel with weights
    via_factory = create_model("lenet", in_channels=1, num_classes=10, image_size=28, weights=path)
    assert torch.equal(predict_logits(via_factory, images, CPU), predict_logits(model, images, CPU))


def test_checkpoint_errors_leave_model_untouched(trained_lenet, tmp_path: Path):
    model, _ = trained_lenet
    path = tmp_path / "lenet.safetensors"
    save_checkpoint(path, model, {})
    other = create_model("lenet", in_channels=1, num_classes=5, image_size=28)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CorruptFileError, match="shape mismatch"):
        load_checkpoint(path, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(CorruptFileError, match="missing"):
        load_checkpoint(
            path, create_model("resnet20", in_channels=1, num_classes=10, image_size=28)
        )
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError):
        load_checkpoint(truncated, _lenet())
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptFileError):
        load_checkpoint(garbage, _lenet())
    with pytest.raises(DataNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors", _lenet())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_from_torch_state_dict_files(tmp_path: Path):
    source = _lenet()
    bare = tmp_path / "bare.pth"
    torch.save(source.net.state_dict(), bare)  # e.g. a torchvision-style bare network
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": source.state_dict()}, wrapped)
    images = torch.rand(3, 1, 28, 28)
    expected = predict_logits(source, images, CPU)
    for path in (bare, wrapped):
        torch.manual_seed(1)
        loaded = create_model("lenet", in_channels=1, num_classes=10, image_size=28, weights=path)
        assert torch.equal(predict_logits(loaded, images, CPU), expected)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04junk")
    with pytest.raises(CorruptFileError):
        create_model("lenet", in_channels=1, num_classes=10, image_size=28, weights=bad)
    with pytest.raises(DataNotFoundError):
        create_model(
            "lenet", in_channels=1, num_classes=10, image_size=28, weights=tmp_path / "none.pt"
        )


def test_fast_frozen_copy_folds_batchnorm_and_leaves_the_original_alone() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=3, image_size=32).eval()
    with torch.no_grad():  # non-trivial running statistics, so folding is really tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(8, 3, 32, 32)
    fast = fast_frozen_copy(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_fast_frozen_copy_runs_untraceable_models_unfolded() -> None:
    class DataDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y  # control flow on a value: fx cannot trace it

    model = DataDependent().eval()
    x = torch.rand(2, 1, 8, 8)
    fast = fast_frozen_copy(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
