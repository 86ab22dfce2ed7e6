"""Training defences: one switchable-precision model (shared weights, per-precision BatchNorm
and quantizer ranges) trained by each recipe; each recipe does what it claims on LeNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantpatch.defenses.training import RECIPES, create_recipe, train_recipe
from quantpatch.errors import ConfigError, UnknownNameError
from quantpatch.models import TrainConfig, create_model, predict_logits
from quantpatch.quant import FP32, QuantSpec, calibrate
from quantpatch.quant.switchable import SwitchablePrecision

W4A4, W2A2 = QuantSpec.parse("w4a4"), QuantSpec.parse("w2a2")
SCHEDULE = TrainConfig(epochs=2, lr=0.05, batch_size=64, seed=0)
PATCH = 5


def _resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", in_channels=1, num_classes=10, image_size=28)


def test_precisions_share_weights_but_not_batchnorm_or_quantizers() -> None:
    model = SwitchablePrecision.from_float(_resnet(), [FP32, W4A4, W2A2])
    (fp32_conv, fp32_bn), (w4a4_conv, w4a4_bn) = (
        (m.get_submodule("net.stem.0.0"), m.get_submodule("net.stem.0.1"))
        for m in (model.member("fp32"), model.member("w4a4"))
    )
    assert fp32_conv.weight is w4a4_conv.weight  # shared: one parameter
    assert fp32_bn.weight is not w4a4_bn.weight  # switchable BatchNorm
    assert fp32_bn.running_mean is not w4a4_bn.running_mean
    with torch.no_grad():
        fp32_conv.weight.mul_(2)
    assert torch.equal(fp32_conv.weight, w4a4_conv.weight)
    unique = {id(p) for p in model.parameters()}
    assert len(unique) < sum(1 for m in model.members.values() for _ in m.parameters())
    with pytest.raises(ConfigError, match="no precision"):
        model.member("w8a8")


def test_random_precision_draws_per_image_and_repeats_after_reseed() -> None:
    model = SwitchablePrecision.from_float(_resnet(), [FP32, W2A2]).eval()
    x = torch.rand(64, 1, 28, 28)
    calibrate(model.member("w2a2"), x, "minmax", "cpu")
    per_member = {n: predict_logits(model.member(n), x, "cpu") for n in model.names}
    model.active = None
    first = predict_logits(model, x, "cpu")
    from_fp32 = torch.isclose(first, per_member["fp32"], atol=1e-5).all(dim=1)
    from_w2a2 = torch.isclose(first, per_member["w2a2"], atol=1e-5).all(dim=1)
    assert bool((from_fp32 | from_w2a2).all())  # each row is one member's logits
    assert from_fp32.any() and from_w2a2.any()  # and both members are drawn
    model.reseed()
    assert torch.equal(predict_logits(model, x, "cpu"), first)


def test_draws_restart_inside_wrappers() -> None:
    """An attack copy or a defence wraps the random model: ``restart_draws`` reaches it, so the
    draws never depend on what ran before."""
    from quantpatch._runtime import restart_draws
    from quantpatch.defenses import DefendedModel, create_defense

    model = SwitchablePrecision.from_float(_resnet(), [FP32, W2A2]).eval()
    model.active = None
    wrapped = DefendedModel(model, create_defense("median", kernel_size=3))
    first = torch.randint(2, (8,), generator=model.generator)
    restart_draws(wrapped)
    assert torch.equal(torch.randint(2, (8,), generator=model.generator), first)


def test_attention_models_share_their_weights_too() -> None:
    """Every weight of a quantized ViT member is the float member's parameter (only norms and
    quantizer ranges are per precision)."""
    vit = create_model("vit_tiny", in_channels=1, num_classes=10, image_size=28)
    model = SwitchablePrecision.from_float(vit, [FP32, W4A4])
    owned = {id(p) for p in model.member("fp32").parameters()}
    for name, param in model.member("w4a4").named_parameters():
        if not any(part in name for part in ("norm", "quant", "scale")):
            assert id(param) in owned, name


def test_members_that_do_not_line_up_are_refused() -> None:
    with pytest.raises(ConfigError, match="cannot share weight"):
        SwitchablePrecision({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(3, 2)})


def test_recipe_names_and_parameters_are_checked() -> None:
    assert {"random-precision", "patch-at", "disalign"} <= set(RECIPES.names())
    with pytest.raises(UnknownNameError):
        create_recipe("adversarial-everything")
    with pytest.raises(ConfigError, match="steps"):
        create_recipe("patch-at", steps=0)
    with pytest.raises(
        ConfigError, match="'disalign' does not take strength; it takes: weight, seed"
    ):
        create_recipe("disalign", strength=2.0)
    for name in RECIPES.names():  # the one check sees every recipe's whole constructor
        with pytest.raises(ConfigError, match=f"recipe '{name}' does not take bogus; it takes: "):
            create_recipe(name, bogus=1)


@pytest.fixture(scope="module")
def trained(lab) -> dict[str, SwitchablePrecision]:
    """LeNet (from the attack tests' fixture) trained by every recipe at fp32 and w2a2."""
    return {
        name: train_recipe(
            lab.model,
            [W2A2],
            create_recipe(name, **params),
            lab.train,
            SCHEDULE,
            calibration="minmax",
            device="cpu",
            progress=False,
        )  # fmt: skip
        for name, params in (
            ("random-precision", {}),
            ("patch-at", {"patch_size": PATCH}),
            ("disalign", {"weight": 10.0}),
        )  # fmt: skip
    }


def _accuracy(model: torch.nn.Module, lab) -> float:
    return float((predict_logits(model, lab.images, "cpu").argmax(1) == lab.labels).float().mean())


def test_every_recipe_keeps_every_precision_accurate(trained, lab) -> None:
    clean = float((lab.clean == lab.labels).float().mean())
    for name, model in trained.items():
        for precision in model.names:
            accuracy = _accuracy(model.member(precision), lab)
            assert accuracy > clean - 0.15, (name, precision, accuracy, clean)


def test_patch_adversarial_training_crafts_adversarial_patches(trained, lab) -> None:
    """The patches patch-at trains on are adversarial for the precision drawn: they fool it far
    more than the same patches' random starting points at the same places."""
    member = trained["random-precision"].member("w2a2").eval()

    def fooled(steps: int, step_size: float) -> float:
        crafter = create_recipe("patch-at", patch_size=PATCH, steps=steps, step_size=step_size,
                                universal_fraction=0.0, seed=7)  # fmt: skip
        patched = crafter.patched(member, lab.images, lab.labels)
        with torch.no_grad():
            return float((member(patched).argmax(1) != lab.labels).float().mean())

    assert fooled(steps=10, step_size=0.25) > fooled(steps=1, step_size=0.0) + 0.15


def test_disalignment_turns_the_precisions_gradients_apart(trained, lab) -> None:
    """The regulariser's own claim: fp32 and w2a2 input gradients are less aligned than after
    joint training without it (mean |cosine| over held-out images)."""

    def alignment(model: SwitchablePrecision) -> float:
        grads = []
        for name in ("fp32", "w2a2"):
            x = lab.images.clone().requires_grad_(True)
            F.cross_entropy(model.member(name).eval()(x), lab.labels).backward()
            grads.append(x.grad.flatten(1))
        return float(F.cosine_similarity(*grads, dim=1).abs().mean())

    assert alignment(trained["disalign"]) < alignment(trained["random-precision"]) - 0.1
