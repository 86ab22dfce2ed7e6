"""Input-transformation defences: registry, batching, range, accuracy, BPDA gradients, codecs."""

from __future__ import annotations

import functools
import inspect
import io

import numpy as np
import pytest
import torch
from PIL import Image

from quantpatch.attacks import create_attack
from quantpatch.data import Split, load_dataset
from quantpatch.defenses import (
    DEFENSES,
    Certifier,
    DefendedModel,
    InputDefense,
    create_defense,
)
from quantpatch.errors import ConfigError, ShapeError, UnknownNameError
from quantpatch.models import create_model, fast_frozen_copy

INPUT_DEFENSES = [n for n in DEFENSES.names() if issubclass(DEFENSES.get(n), InputDefense)]
NON_DIFFERENTIABLE = {n for n in INPUT_DEFENSES if not DEFENSES.get(n).differentiable}
# Clean accuracy of the mnist_lenet_fp32 fixture on the first 500 test digits, as measured:
# undefended 95.2 %, bit-depth 95.2, jpeg 95.2, gaussian-blur 95.0, median 94.6, lgs 84.6 (it
# damps digit strokes too). The floor only catches a broken defence.
MIN_CLEAN_ACCURACY = 0.8


@functools.cache
def _test_images() -> torch.Tensor:
    return load_dataset("mnist5k").test.images[:8]


def digits(n: int = 8) -> torch.Tensor:
    """The first ``n`` (<= 8) mnist5k test digits."""
    return _test_images()[:n].clone()


def test_every_registered_defense_is_of_a_known_kind() -> None:
    """Input defences state ``differentiable`` themselves (not inherited); the rest certify."""
    for name in DEFENSES.names():
        factory = DEFENSES.get(name)
        if not issubclass(factory, Certifier):
            assert issubclass(factory, InputDefense) and "differentiable" in vars(factory)
    assert {"median", "lgs", "gaussian-blur", "jpeg", "bit-depth"} <= set(INPUT_DEFENSES)
    assert {"jpeg", "bit-depth", "lgs"} <= NON_DIFFERENTIABLE  # rounding, codecs, thresholds


@pytest.mark.parametrize("name", INPUT_DEFENSES)
@pytest.mark.parametrize("channels", [1, 3])
def test_defense_keeps_shape_and_range(name: str, channels: int) -> None:
    images = torch.rand(4, channels, 16, 16, generator=torch.Generator().manual_seed(0))
    out = create_defense(name)(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)  # every default setting changes random images


@pytest.mark.parametrize("name", INPUT_DEFENSES)
def test_batched_output_equals_per_image_output(name: str) -> None:
    images = torch.cat(
        [digits(4), torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))]
    )
    defense = create_defense(name)
    batched = defense(images)
    single = torch.cat([defense(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)  # conv sums may reorder
    assert len(defense(images[:0])) == 0


def test_clean_accuracy_behind_each_defense(mnist_lenet_fp32) -> None:
    ds, model = mnist_lenet_fp32
    images, labels = ds.test.images[:500], ds.test.labels[:500]
    with torch.no_grad():
        undefended = (model(images).argmax(1) == labels).float().mean().item()
    assert undefended > 0.9
    for name in INPUT_DEFENSES:
        accuracy = (create_defense(name).predict(model, images) == labels).float().mean().item()
        assert accuracy >= MIN_CLEAN_ACCURACY, (name, accuracy)


@pytest.mark.parametrize("name", INPUT_DEFENSES)
def test_gradient_flows_through_defended_model(name: str, mnist_lenet_fp32) -> None:
    """Non-differentiable defences pass the gradient straight through (BPDA): the gradient
    w.r.t. x equals the model's gradient at the defended image d(x)."""
    _, model = mnist_lenet_fp32
    images, labels = digits(4), torch.tensor([7, 2, 1, 0])
    defense = create_defense(name)
    x = images.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(DefendedModel(model, defense)(x), labels).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if name in NON_DIFFERENTIABLE:
        at = defense(images).detach().requires_grad_(True)
        torch.nn.functional.cross_entropy(model(at), labels).backward()
        torch.testing.assert_close(x.grad, at.grad)


@pytest.fixture(scope="module")
def resnet20() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(
        "resnet20", in_channels=1, num_classes=10, image_size=28, mean=(0.13,), std=(0.31,)
    ).eval()


@pytest.mark.parametrize("name", INPUT_DEFENSES)
def test_fast_frozen_copy_keeps_defense_and_bpda(name: str, resnet20: torch.nn.Module) -> None:
    """resnet20 has BatchNorm, so fast_frozen_copy fx-traces the defended model to fold it:
    the copy must compute the same function and keep the straight-through gradient."""
    defended = DefendedModel(resnet20, create_defense(name))
    fast = fast_frozen_copy(defended)
    x = digits(3).requires_grad_(True)
    out = fast(x)
    torch.testing.assert_close(out, defended(x), atol=1e-4, rtol=1e-4)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (reference,) = torch.autograd.grad(defended(x).sum(), x)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, reference, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", INPUT_DEFENSES)
def test_universal_patch_attack_runs_through_defended_model(name: str, mnist_lenet_fp32) -> None:
    """An adaptive attack: the patch learned through the defence moves (non-zero gradients)."""
    ds, model = mnist_lenet_fp32
    train = Split(ds.train.images[:64], ds.train.labels[:64])
    source = DefendedModel(model, create_defense(name))
    patches = []
    for steps in (0, 2):
        attack = create_attack(
            "universal", patch_size=6, steps=steps, batch_size=16, progress=False
        )
        attack.fit([source], train, "cpu")
        patches.append(attack.patch)
    assert not torch.equal(*patches)


def test_jpeg_uses_the_codec() -> None:
    images = digits(2)
    out = create_defense("jpeg", quality=50)(images)
    assert not torch.equal(out, images)
    # an independent libjpeg round trip (Pillow) of one image gives the same 8-bit codes
    codes = (images[1, 0] * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(codes, mode="L").save(buffer, format="JPEG", quality=50)
    reference = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.int16)
    ours = (out[1, 0] * 255).round().to(torch.int16).numpy()
    assert np.abs(ours - reference).max() <= 1
    low = create_defense("jpeg", quality=5)(images)
    assert (low - images).abs().mean() > (out - images).abs().mean()


def test_jpeg_rgb_and_channel_check() -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert create_defense("jpeg")(images).shape == images.shape
    with pytest.raises(ShapeError):
        create_defense("jpeg")(torch.rand(1, 2, 8, 8))


def test_bit_depth_levels() -> None:
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = create_defense("bit-depth", bits=2)(images)
    assert set((out * 3).round().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    torch.testing.assert_close(out * 3, (out * 3).round())
    assert set(create_defense("bit-depth", bits=1)(images).unique().tolist()) <= {0.0, 1.0}


def test_gaussian_blur_kernel_and_constancy() -> None:
    blur = create_defense("gaussian-blur", sigma=1.0)
    assert blur.radius == 3 and blur.kernel.numel() == 7
    flat = torch.full((1, 3, 9, 9), 0.3)
    torch.testing.assert_close(blur(flat), flat)
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[0, 0, 7, 7] = 1.0
    out = blur(impulse)
    assert out[0, 0, 7, 7] < 0.2 and abs(out.sum().item() - 1.0) < 1e-5


def test_median_removes_isolated_spike() -> None:
    images = torch.zeros(1, 1, 9, 9)
    images[0, 0, 4, 4] = 1.0
    assert create_defense("median", kernel_size=3)(images).abs().max() == 0


def test_lgs_damps_a_high_frequency_patch_but_not_a_smooth_image() -> None:
    smooth = torch.linspace(0.2, 0.8, 28).repeat(1, 1, 28, 1)
    patched = smooth.clone()
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    patched[0, 0, 10:18, 10:18] = checker.float()
    lgs = create_defense("lgs")
    assert (lgs(smooth) - smooth).abs().max() < 0.05
    assert (lgs(patched) - patched)[0, 0, 10:18, 10:18].abs().mean() > 0.2


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("median", {"kernel_size": 2}),
        ("median", {"kernel_size": 0}),
        ("median", {"kernel_size": 3.0}),
        ("median", {"bogus": 1}),
        ("lgs", {"window": 0}),
        ("lgs", {"threshold": 1.5}),
        ("lgs", {"strength": -1}),
        ("gaussian-blur", {"sigma": 0}),
        ("gaussian-blur", {"sigma": float("nan")}),
        ("jpeg", {"quality": 0}),
        ("jpeg", {"quality": 101}),
        ("jpeg", {"quality": True}),
        ("bit-depth", {"bits": 0}),
        ("bit-depth", {"bits": 9}),
        ("patchcleanser", {}),
        ("patchcleanser", {"patch_size": 0}),
        ("patchcleanser", {"patch_size": 3, "masks_per_axis": 0}),
        ("patchcleanser", {"patch_size": 3, "masks_per_axis": 4, "stride": 2}),
        ("patchcleanser", {"patch_size": 3, "mask_value": 2.0}),
    ],
)
def test_bad_parameters_raise_config_error(name: str, params: dict) -> None:
    with pytest.raises(ConfigError):
        create_defense(name, **params)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_is_built_through_the_one_parameter_check(name: str) -> None:
    """An unknown parameter is refused by name for every defence, before its constructor runs
    (so no constructor hides a parameter behind ``**kwargs`` or a positional-only argument)."""
    with pytest.raises(ConfigError, match=f"defense '{name}' does not take bogus; it takes: "):
        create_defense(name, bogus=1)
    init = inspect.signature(DEFENSES.get(name)).parameters.values()
    assert not [p for p in init if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)]
    required = [p.name for p in init if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    if required:  # patchcleanser's patch_size
        with pytest.raises(ConfigError, match=f"defense '{name}' needs {', '.join(required)}; "):
            create_defense(name)


def test_defended_model_needs_an_input_defense() -> None:
    model = DefendedModel(torch.nn.Flatten(), create_defense("median"))
    assert model(torch.rand(2, 1, 5, 5)).shape == (2, 25)
    with pytest.raises(UnknownNameError):
        create_defense("nope")
    with pytest.raises(ConfigError):
        DefendedModel(torch.nn.Flatten(), create_defense("patchcleanser", patch_size=2))
