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
    assert {"random-precision", "patch-at", "disalign", "dwq"} <= set(RECIPES.names())
    with pytest.raises(UnknownNameError):
        create_recipe("adversarial-everything")
    with pytest.raises(ConfigError, match="steps"):
        create_recipe("patch-at", steps=0)
    with pytest.raises(ConfigError, match="dwq attack must be one of fgsm, pgd, patch"):
        create_recipe("dwq", attack="cw")
    with pytest.raises(
        ConfigError,
        match="'disalign' does not take strength; it takes: weight, feature_weight, "
        "structure_weight, seed",
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
            ("dwq", {"attack": "pgd", "eps": 0.1, "steps": 3}),
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

    assert fooled(steps=10, step_size=0.25) > fooled(steps=1, step_size=0.0) + 0.1


def test_patch_at_finishes_each_patch_where_it_hurts_most(trained, lab) -> None:
    """The placement search keeps, per image, the candidate place of highest loss (its own
    place among them, so never a worse one), and the patches it trains on fool more."""
    from quantpatch.attacks.placement import paste_at

    member = trained["random-precision"].member("w2a2").eval()
    images, labels = lab.images[:64], lab.labels[:64]
    crafter = create_recipe("patch-at", patch_size=PATCH, placements=8, seed=3)
    patches = torch.rand(64, 1, PATCH, PATCH, generator=torch.Generator().manual_seed(0))
    tops, lefts = crafter.random_places(images, PATCH)
    moved = crafter.worst_places(member, images, labels, patches, tops.clone(), lefts.clone())

    def loss(places) -> torch.Tensor:
        with torch.no_grad():
            logits = member(paste_at(images, patches, *places))
        return F.cross_entropy(logits, labels, reduction="none")

    before, after = loss((tops, lefts)), loss(moved)
    assert (after >= before - 1e-6).all() and (after > before + 1e-3).float().mean() > 0.5

    def fooled(placements: int) -> float:
        crafter = create_recipe("patch-at", patch_size=PATCH, steps=4, placements=placements,
                                universal_fraction=0.0, seed=7)  # fmt: skip
        patched = crafter.patched(member, lab.images, lab.labels)
        with torch.no_grad():
            return float((member(patched).argmax(1) != lab.labels).float().mean())

    assert fooled(placements=8) > fooled(placements=1) + 0.05


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


def _pgd_robust_accuracy(model: torch.nn.Module, lab, eps: float = 0.1) -> float:
    """Accuracy under 10-step PGD (torchattacks' reference: the study's pixel attack)."""
    from quantpatch.attacks import create_attack

    attack = create_attack("pgd-linf", eps=eps, steps=10, progress=False)
    adversarial = attack.perturb([model], lab.images, lab.labels, "cpu")
    return _accuracy_on(model, adversarial, lab.labels)


def _accuracy_on(model, images, labels) -> float:
    return float((predict_logits(model, images, "cpu").argmax(1) == labels).float().mean())


def test_dwq_adversarial_training_makes_every_precision_more_robust(trained, lab) -> None:
    """DWQ's claim: random-precision adversarial training raises robust accuracy at each
    precision over random-precision training without attacks (same schedule; measured when
    written, 512 digits: fp32 59 vs 48 %, w2a2 49 vs 24 %)."""
    gains = []
    for precision in ("fp32", "w2a2"):
        dwq = _pgd_robust_accuracy(trained["dwq"].member(precision).eval(), lab)
        plain = _pgd_robust_accuracy(trained["random-precision"].member(precision).eval(), lab)
        assert dwq > plain + 0.05, (precision, dwq, plain)
        gains.append(dwq - plain)
    assert sum(gains) / len(gains) > 0.1, gains


def test_dwq_trains_only_the_drawn_precision() -> None:
    """One DWQ step moves the BatchNorm statistics of the precision it drew, no other's."""
    model = SwitchablePrecision.from_float(_resnet(), [FP32, W2A2])
    x, y = torch.rand(8, 1, 28, 28), torch.randint(10, (8,))
    calibrate(model.member("w2a2"), x, "minmax", "cpu")
    model.train()
    before = {n: model.member(n).get_submodule("net.stem.0.1").running_mean.clone()
              for n in model.names}  # fmt: skip
    create_recipe("dwq", attack="fgsm", seed=3).loss(model, x, y).backward()
    moved = [n for n in model.names
             if not torch.equal(model.member(n).get_submodule("net.stem.0.1").running_mean,
                                before[n])]  # fmt: skip
    assert len(moved) == 1


def test_disalign_differentiates_both_precisions_gradients() -> None:
    """The penalty has a graph through the quantized precision's input gradient too: its own
    BatchNorm (which only that gradient sees) gets a gradient from the penalty; and the pass
    leaves the model in training mode with learnable scales."""
    from quantpatch.quant import set_learnable

    model = SwitchablePrecision.from_float(_resnet(), [FP32, W2A2])
    x, y = torch.rand(16, 1, 28, 28), torch.randint(10, (16,))
    calibrate(model.member("w2a2"), x, "minmax", "cpu")
    set_learnable(model, True)
    model.train()
    penalty = create_recipe("disalign").penalties(model, x, y)["gradient"]
    own_norm = model.member("w2a2").get_submodule("net.stem.0.1").weight
    (grad,) = torch.autograd.grad(penalty, own_norm)
    assert grad.abs().sum() > 0
    assert model.training
    assert model.member("w2a2").get_submodule("net.stem.0.0").weight_quant.learnable


def test_gradient_attacks_see_every_precision_of_a_random_model() -> None:
    """A random-precision source gives gradient attacks its members (the exact expectation
    over its draws); a query attack sees the model as served; other models are themselves."""
    from quantpatch.attacks import create_attack
    from quantpatch.quant.switchable import attack_members
    from quantpatch.study.grid.threat import Source
    from quantpatch.study.zoo.context import PreparedModel

    model = SwitchablePrecision.from_float(_resnet(), [FP32, W2A2])
    assert attack_members(model) == [model]  # one precision active: itself
    model.active = None
    assert attack_members(model) == [model.member("fp32"), model.member("w2a2")]
    source = Source.single(PreparedModel("resnet20", W2A2, model, "key", label="random-dwq"))
    assert source.predictors(create_attack("patch-pgd", progress=False)) == attack_members(model)
    assert source.predictors(create_attack("sparse-rs", progress=False)) == [model]


@pytest.mark.parametrize(("term", "lr", "drop"), [("feature", 0.05, 0.1), ("structure", 0.5, 0.05)])
def test_disalign_triqdef_terms_train_down(term: str, lr: float, drop: float) -> None:
    """TriQDef's feature term (centred cosine of penultimate features) and structure term (soft
    Edge IoU + HOG cosine of input gradients) are similarities in [0, 1] that a few SGD steps
    on that term alone lower: each penalty can act on the shared weights."""
    from quantpatch.quant import set_learnable

    torch.manual_seed(0)
    model = SwitchablePrecision.from_float(
        create_model("lenet", in_channels=1, num_classes=10, image_size=28), [FP32, W2A2]
    )
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.randint(10, (16,), generator=torch.Generator().manual_seed(2))
    calibrate(model.member("w2a2"), x, "minmax", "cpu")
    set_learnable(model, True)
    recipe = create_recipe("disalign", weight=0.0, feature_weight=1.0, structure_weight=1.0)
    before = {k: float(v.detach()) for k, v in recipe.penalties(model, x, y).items()}
    assert set(before) == {"gradient", "feature", "structure"}
    assert all(0.0 <= v <= 1.0 for v in before.values()), before
    optimiser = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(8):
        optimiser.zero_grad()
        recipe.penalties(model, x, y)[term].backward()
        optimiser.step()
    after = float(recipe.penalties(model, x, y)[term].detach())
    assert after < before[term] - drop, (term, before[term], after)
