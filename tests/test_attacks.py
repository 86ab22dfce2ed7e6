"""Attacks: exact and transformed patch placement, the registry, and real attack outcomes on a
LeNet trained for a few seconds on 512 mnist5k digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quantpatch._io import load_tensors, save_tensors
from quantpatch._registry import Registry
from quantpatch.attacks import (
    ATTACKS,
    EOT,
    Attack,
    PerImageAttack,
    Placement,
    UniversalAttack,
    apply_patch,
    create_attack,
    paste_at,
    patch_mask,
    sample_placement,
)
from quantpatch.attacks.placement import make_canvas, prepare_paste
from quantpatch.data import Split
from quantpatch.errors import (
    ConfigError,
    CorruptFileError,
    PatchTooLargeError,
    QuantpatchError,
    ShapeError,
    UnknownNameError,
)
from quantpatch.metrics import attack_success
from quantpatch.models import create_model, predict_logits

CPU = torch.device("cpu")
ALL_ATTACKS = {
    "universal", "random", "lavan", "patch-pgd", "multibit", "pgd-linf",
    "sparse-rs", "sparse-rs-universal", "gap", "square-linf", "apgd-ce", "apgd-dlr",
}  # fmt: skip


def reference_paste(images, patch, placement, mask=None):
    """Whole-image affine_grid + grid_sample: the slow, obviously right version."""
    n, c, h, w = images.shape
    canvas = make_canvas(patch, mask)
    grid = F.affine_grid(placement.theta((h, w), patch.shape[-1]), [n, c + 1, h, w], False)
    sampled = F.grid_sample(canvas.expand(n, -1, -1, -1), grid, align_corners=False)
    return images * (1 - sampled[:, c:]) + sampled[:, :c]


# ---------------------------------------------------------------------------- placement
def test_fixed_integer_paste_equals_slicing():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 20, 24, generator=gen)
    shared = torch.rand(3, 6, 6, generator=gen)
    per_image = torch.rand(5, 3, 6, 6, generator=gen)
    for top, left in [(0, 0), (3, 7), (14, 18)]:
        placement = Placement.fixed(5, top, left, 6)
        for patch in (shared, per_image):
            expected = images.clone()
            expected[:, :, top : top + 6, left : left + 6] = patch
            assert torch.equal(apply_patch(images, patch, placement), expected)
    assert prepare_paste(Placement.fixed(5, 3, 7, 6), (20, 24), 6).exact


def test_paste_at_is_the_exact_path_out_of_place():
    images = torch.zeros(3, 2, 6, 7)
    patch = torch.arange(2 * 2 * 3.0).view(2, 2, 3) + 1  # rectangular
    tops, lefts = torch.tensor([0, 4, 2]), torch.tensor([4, 0, 2])
    out = paste_at(images, patch, tops, lefts)
    assert images.abs().sum() == 0  # never in place
    for k in range(3):
        top, left = int(tops[k]), int(lefts[k])
        assert torch.equal(out[k, :, top : top + 2, left : left + 3], patch)
        assert out[k].sum() == patch.sum()
    half = paste_at(torch.ones(3, 2, 6, 7), patch, tops, lefts, torch.full((1, 2, 3), 0.5))
    assert torch.allclose(half[0, :, 0:2, 4:7], 0.5 + 0.5 * patch)
    per_channel = torch.stack([torch.ones(2, 3), torch.zeros(2, 3)])  # paste channel 0 only
    mixed = paste_at(torch.ones(3, 2, 6, 7), patch, tops, lefts, per_channel)
    assert torch.equal(mixed[0, 0, 0:2, 4:7], patch[0]) and (mixed[:, 1] == 1).all()
    # the same kernel as apply_patch at integer placements, also for per-image patches
    square = torch.rand(3, 2, 4, 4)
    placement = Placement.fixed(3, 1, 2, 4)
    expected = apply_patch(images, square, placement, patch_mask(4, "circle"))
    ones = torch.ones(3, dtype=torch.long)
    assert torch.equal(paste_at(images, square, ones, 2 * ones, patch_mask(4, "circle")), expected)
    with pytest.raises(PatchTooLargeError):
        paste_at(images, patch, tops, torch.tensor([5, 0, 0]))  # would wrap into the next row
    with pytest.raises(ShapeError):
        paste_at(images, torch.rand(3, 2, 2), tops, lefts)


def test_circle_mask_paste_is_exact_inside_and_untouched_outside():
    mask = patch_mask(9, "circle")
    assert mask.shape == (1, 9, 9)
    assert torch.equal(mask, mask.flip(1)) and torch.equal(mask, mask.transpose(1, 2))
    assert mask[0, 4, 4] == 1 and mask[0, 0, 0] == 0 and mask[0, 4, 0] == 1
    assert abs(float(mask.sum()) - math.pi * 4.5**2) < 9  # area of the inscribed disc
    assert torch.equal(patch_mask(9, "square"), torch.ones(1, 9, 9))
    images, patch = torch.rand(2, 1, 16, 16), torch.rand(1, 9, 9)
    out = apply_patch(images, patch, Placement.fixed(2, 2, 5, 9), mask)
    expected = images.clone()
    window = expected[:, :, 2:11, 5:14]
    expected[:, :, 2:11, 5:14] = torch.where(mask.bool(), patch, window)
    assert torch.equal(out, expected)
    with pytest.raises(ConfigError):
        patch_mask(9, "triangle")


def test_random_location_without_transforms_is_inside_and_exact():
    images = torch.rand(64, 3, 28, 28)
    patch = torch.rand(64, 3, 8, 8)
    eot = EOT(rotation_max_deg=0, location="random")
    placement = sample_placement(64, (28, 28), 8, eot, torch.Generator().manual_seed(1))
    top, left = placement.top_left(8)
    assert torch.equal(top, top.round()) and torch.equal(left, left.round())
    assert top.min() >= 0 and left.min() >= 0 and top.max() <= 20 and left.max() <= 20
    assert len(set(top.tolist())) > 5  # actually random
    out = apply_patch(images, patch, placement)
    for i in range(64):
        t, s = int(top[i]), int(left[i])
        assert torch.equal(out[i, :, t : t + 8, s : s + 8], patch[i])
        rest = torch.ones(28, 28, dtype=torch.bool)
        rest[t : t + 8, s : s + 8] = False
        assert torch.equal(out[i][:, rest], images[i][:, rest])


def test_transformed_paste_matches_full_image_reference_and_stays_inside():
    gen = torch.Generator().manual_seed(2)
    images, patch = torch.rand(48, 3, 30, 26, generator=gen), torch.rand(3, 7, 7, generator=gen)
    eot = EOT(rotation_max_deg=180, scale_min=0.6, scale_max=1.6)
    placement = sample_placement(48, (30, 26), 7, eot, gen)
    assert placement.angle.abs().max() > 1.0 and placement.scale.max() > 1.2
    for mask in (None, patch_mask(7, "circle")):
        out = apply_patch(images, patch, placement, mask)
        torch.testing.assert_close(out, reference_paste(images, patch, placement, mask))
    # fully inside: all corners of every rotated, scaled square lie in the image ...
    half = placement.scale * 3.5
    for sy, sx in [(-1, -1), (-1, 1), (1, -1), (1, 1)]:
        dy, dx = sy * half, sx * half
        cos, sin = placement.angle.cos(), placement.angle.sin()
        y = placement.cy + dy * cos + dx * sin
        x = placement.cx - dy * sin + dx * cos
        assert y.min() >= -1e-4 and y.max() <= 30 + 1e-4
        assert x.min() >= -1e-4 and x.max() <= 26 + 1e-4
    # ... so the pasted coverage (alpha) keeps the full area of each patch
    alpha = apply_patch(torch.zeros(48, 1, 30, 26), torch.ones(1, 7, 7), placement)
    torch.testing.assert_close(
        alpha.sum(dim=(1, 2, 3)), (7 * placement.scale) ** 2, rtol=0.03, atol=0
    )


def test_gradient_reaches_the_patch_on_both_paths():
    images = torch.rand(4, 1, 16, 16)
    for placement in (
        Placement.fixed(4, 3, 3, 5),
        sample_placement(4, (16, 16), 5, EOT(), torch.Generator().manual_seed(0)),
    ):
        patch = torch.rand(1, 5, 5, requires_grad=True)
        apply_patch(images, patch, placement).sum().backward()
        assert patch.grad is not None and bool((patch.grad > 0).all())
    patch = torch.rand(1, 5, 5, requires_grad=True)
    apply_patch(
        images, patch, Placement.fixed(4, 3, 3, 5), patch_mask(5, "circle")
    ).sum().backward()
    assert torch.equal(patch.grad, 4 * patch_mask(5, "circle"))  # one unit per image, masked


def test_placement_errors():
    images = torch.rand(2, 3, 10, 10)
    with pytest.raises(PatchTooLargeError):
        apply_patch(images, torch.rand(3, 11, 11), Placement.fixed(2, 0, 0, 11))
    with pytest.raises(PatchTooLargeError):
        sample_placement(2, (10, 10), 8, EOT(scale_max=1.5), torch.Generator())
    with pytest.raises(PatchTooLargeError):
        sample_placement(2, (10, 10), 4, EOT(rotation_max_deg=0, location=(0, 7)), None)
    with pytest.raises(ShapeError, match="channels"):
        apply_patch(images, torch.rand(1, 4, 4), Placement.fixed(2, 0, 0, 4))
    with pytest.raises(ShapeError):
        apply_patch(images[0], torch.rand(3, 4, 4), Placement.fixed(2, 0, 0, 4))
    with pytest.raises(ShapeError):
        apply_patch(images, torch.rand(3, 4, 5), Placement.fixed(2, 0, 0, 4))
    with pytest.raises(ShapeError, match="entries"):
        apply_patch(images, torch.rand(3, 4, 4), Placement.fixed(3, 0, 0, 4))
    with pytest.raises(ShapeError):
        apply_patch(images, torch.rand(3, 4, 4), Placement.fixed(2, 0, 0, 4), torch.ones(1, 5, 5))
    with pytest.raises(ConfigError):
        EOT(scale_min=2.0, scale_max=1.0)
    with pytest.raises(ConfigError):
        EOT(location=(1.5, 2))


def test_sampling_is_seeded_and_prefix_stable():
    eot = EOT(scale_min=0.8, scale_max=1.2)
    a = sample_placement(10, (32, 32), 6, eot, torch.Generator().manual_seed(5))
    b = sample_placement(30, (32, 32), 6, eot, torch.Generator().manual_seed(5))
    for name in ("cy", "cx", "angle", "scale"):
        assert torch.equal(getattr(a, name), getattr(b, name)[:10])
    centre = sample_placement(3, (28, 28), 8, EOT(rotation_max_deg=0, location="center"), None)
    assert centre.top_left(8)[0].tolist() == [10.0] * 3


# ---------------------------------------------------------------------------- registry
def test_registry_takes_names_and_help_from_definitions():
    registry: Registry = Registry("thing")

    @registry.register
    class Named:
        """First line is the help.

        Not this one."""

        name = "named-thing"

    @registry.register
    def plain_function():
        """Function help."""

    @registry.register("not-an-identifier", help="explicit help")
    def explicit():
        """Ignored when help is given."""

    @registry.register()
    def empty_call():
        pass

    assert registry.describe() == [
        ("empty_call", ""),
        ("named-thing", "First line is the help."),
        ("not-an-identifier", "explicit help"),
        ("plain_function", "Function help."),
    ]
    assert registry.get("named-thing") is Named and registry.get("plain_function") is plain_function
    assert explicit is registry.get("not-an-identifier")  # the decorator returns the factory
    with pytest.raises(ValueError, match="twice"):

        @registry.register
        class Forgot(Named):  # inherits "named-thing": a clash, not a silent "Forgot"
            pass

    with pytest.raises(ValueError, match="non-empty"):
        registry.register(type("Nameless", (Attack,), {}))


def test_registry_lists_all_attacks_with_their_kinds():
    assert set(ATTACKS.names()) == ALL_ATTACKS
    for name in ATTACKS.names():
        cls = ATTACKS.get(name)
        assert issubclass(cls, Attack) and cls.kind in ("patch", "pixel")
        attack = create_attack(name, seed=3, progress=False)
        assert attack.seed == 3 and isinstance(attack.config(), dict)
    assert ATTACKS.get("pgd-linf").kind == "pixel" and not ATTACKS.get("pgd-linf").universal
    assert not ATTACKS.get("patch-pgd").universal and ATTACKS.get("universal").universal
    assert [n for n in ATTACKS.names() if ATTACKS.get(n).multi_precision] == ["multibit"]
    query_only = [n for n in ATTACKS.names() if not ATTACKS.get(n).needs_gradients]
    assert query_only == ["sparse-rs", "sparse-rs-universal", "square-linf"]


def test_each_attack_sits_on_the_base_of_its_family():
    per_image = {"patch-pgd", "pgd-linf", "apgd-ce", "apgd-dlr"}
    for name in ATTACKS.names():
        cls = ATTACKS.get(name)
        assert issubclass(cls, UniversalAttack) == cls.universal or name == "lavan"
        assert issubclass(cls, PerImageAttack) == (name in per_image | {"lavan"})
    for query in ("sparse-rs", "square-linf"):  # no gradients: neither family's machinery
        assert not issubclass(ATTACKS.get(query), (UniversalAttack, PerImageAttack))
    # lavan has both modes: each instance fits, pastes and saves as its mode's base does
    lavan = create_attack("lavan", mode="per-image", patch_size=4, steps=1, progress=False)
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=28)
    lavan.fit([model], Split(torch.rand(4, 1, 28, 28), torch.arange(4)), CPU)
    assert lavan.patch is None and lavan.state_dict() == {}
    with pytest.raises(ConfigError, match="holds no patch"):
        lavan.load_state_dict({"patch": torch.rand(1, 4, 4)})
    universal = create_attack("lavan", patch_size=4, steps=1, progress=False)
    universal.load_state_dict({"patch": torch.rand(1, 4, 4)})
    assert universal.state_dict()["patch"].shape == (1, 4, 4)


def test_one_objective_averages_the_models_for_fits_and_searches():
    torch.manual_seed(0)
    models = [create_model("lenet", in_channels=1, num_classes=10, image_size=28).eval()
              for _ in range(2)]  # fmt: skip
    images, labels = torch.rand(6, 1, 28, 28), torch.arange(6)
    attack = create_attack("patch-pgd", progress=False)
    each = [F.cross_entropy(m(images), labels, reduction="none") for m in models]
    fooled = [m(images).argmax(1) != labels for m in models]
    per_image, success = attack.objective(models, images, labels, reduction="none")
    assert torch.allclose(per_image, (each[0] + each[1]) / 2)
    assert torch.equal(success, fooled[0] & fooled[1])
    mean, _ = attack.objective(models, images, labels)
    assert torch.allclose(mean, per_image.mean())
    alone, _ = attack.objective(models[:1], images, labels)
    assert torch.equal(alone, F.cross_entropy(models[0](images), labels))
    targeted = create_attack("patch-pgd", targeted=True, target_class=1, progress=False)
    score, _ = targeted.signed_objective(models, images, torch.ones_like(labels))
    loss, _ = targeted.objective(models, images, torch.ones_like(labels), reduction="none")
    assert torch.equal(score, -loss)  # the search ascends towards the target


def test_per_image_template_gives_attack_batch_frozen_models_and_attack_labels():
    seen = []

    class Probe(PerImageAttack):
        name = "probe"

        def attack_batch(self, models, x, y, generator):
            seen.append((models[0], y.clone(), float(torch.rand(1, generator=generator))))
            return 1 - x

    model = create_model("lenet", in_channels=1, num_classes=10, image_size=28).train()
    images, labels = torch.rand(7, 1, 28, 28), torch.arange(7)
    probe = Probe(targeted=True, target_class=2, batch_size=3, progress=False)
    assert torch.equal(probe.perturb([model], images, labels, CPU), 1 - images)
    assert [len(y) for _, y, _ in seen] == [3, 3, 1] and all((y == 2).all() for _, y, _ in seen)
    frozen = seen[0][0]
    assert frozen is not model and not frozen.training and model.training
    assert not any(p.requires_grad for p in frozen.parameters())
    assert len({draw for *_, draw in seen}) == 3  # one seeded stream, shared in batch order
    probe.fit([model], Split(images, labels), CPU)  # per-image: nothing to learn
    assert probe.state_dict() == {} and probe.fit_curve == ()
    with pytest.raises(ConfigError, match="holds no patch"):
        probe.load_state_dict({"patch": torch.rand(1, 8, 8)})


def test_create_attack_rejects_bad_names_and_params():
    with pytest.raises(UnknownNameError, match="universal"):
        create_attack("nope")
    with pytest.raises(
        ConfigError, match="attack 'universal' does not take eps; it takes: eval_eot"
    ):
        create_attack("universal", eps=0.1)
    with pytest.raises(ConfigError):
        create_attack("universal", targeted=True)  # no target_class
    with pytest.raises(ConfigError):
        create_attack("patch-pgd", shape="hexagon")
    with pytest.raises(ConfigError):
        create_attack("patch-pgd", steps=-1)
    with pytest.raises(ConfigError):
        create_attack("lavan", location="random")
    with pytest.raises(ConfigError):
        create_attack("lavan", eot={"rotation_max_deg": 10})
    with pytest.raises(ConfigError):
        create_attack("universal", eot={"rotation": 10})
    with pytest.raises(ConfigError):
        create_attack("patch-pgd", eot={"rotation_max_deg": 10})  # search: integer grid only
    rotated = create_attack("patch-pgd", location="random", eot={"rotation_max_deg": 10})
    assert rotated.eot.rotation_max_deg == 10 and create_attack("patch-pgd").location == "search"
    with pytest.raises(ConfigError):
        create_attack("pgd-linf", early_stop="yes")
    lavan = create_attack("lavan", mode="per-image", location=[2, 3])
    assert not lavan.universal and lavan.eot.location == (2, 3)
    assert create_attack("universal", eot={"scale_max": 1.2}).eot.rotation_max_deg == 22.5


# ---------------------------------------------------------------------------- trained model
# ``lab`` (conftest): a LeNet trained for a few seconds on 512 digits, with clean predictions.
def asr(lab, adversarial, n=None, target=None):
    n = n or len(adversarial)
    pred = predict_logits(lab.model, adversarial, CPU).argmax(1)
    return attack_success(lab.clean[:n], pred, lab.labels[:n], target)


def only_box_changed(clean, adversarial, top, left, size):
    outside = torch.ones(clean.shape[-2:], dtype=torch.bool)
    outside[top : top + size, left : left + size] = False
    return torch.equal(clean[..., outside], adversarial[..., outside])


def test_patch_pgd_white_box_asr(lab):
    x, y = lab.images[:32], lab.labels[:32]
    # ASR only: stopping each image at its first success keeps this fast
    attack = create_attack(
        "patch-pgd", patch_size=8, steps=40, restarts=2, early_stop=True, progress=False
    )
    adversarial = attack.perturb([lab.model], x, y, CPU)
    assert adversarial.shape == x.shape and adversarial.min() >= 0 and adversarial.max() <= 1
    changed = (adversarial != x).flatten(2).any(1).sum(1)  # pixels changed per image
    assert changed.max() <= 64
    rate = asr(lab, adversarial)
    assert rate.n >= 25 and rate.rate >= 0.9, rate


def test_per_image_attacks_are_deterministic(lab):
    x, y = lab.images[:6], lab.labels[:6]
    for name, params in [("patch-pgd", {"patch_size": 6}), ("pgd-linf", {"eps": 0.1})]:
        first, second = (
            create_attack(name, steps=5, restarts=2, seed=4, progress=False, **params)
            if name == "patch-pgd"
            else create_attack(name, steps=5, seed=4, progress=False, **params)
            for _ in range(2)
        )
        adversarial = first.perturb([lab.model], x, y, CPU)
        assert not torch.equal(adversarial, x)
        assert torch.equal(second.perturb([lab.model], x, y, CPU), adversarial), name


def test_targeted_patch_pgd_counts_only_non_target_images(lab):
    x, y = lab.images[:32], lab.labels[:32]
    attack = create_attack(
        "patch-pgd",
        patch_size=8,
        targeted=True,
        target_class=3,
        steps=50,
        restarts=4,
        location="center",
        early_stop=True,  # ASR only: keeps it fast
        progress=False,
    )
    adversarial = attack.perturb([lab.model], x, y, CPU)
    assert only_box_changed(x, adversarial, 10, 10, 8)
    rate = asr(lab, adversarial, target=3)
    eligible = (lab.clean[:32] == y) & (y != 3)  # clean-correct and not already the target
    assert rate.n == int(eligible.sum()) < int((y != 3).sum()) and rate.rate >= 0.5, rate


def test_pgd_linf_at_eps_02(lab):
    x, y = lab.images[:32], lab.labels[:32]
    attack = create_attack("pgd-linf", eps=0.2, steps=20, progress=False)
    adversarial = attack.perturb([lab.model], x, y, CPU)
    assert (adversarial - x).abs().max() <= 0.2 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    rate = asr(lab, adversarial)
    assert rate.rate >= 0.6, rate


# Without rotation the contrast with noise is larger at this tiny training budget (the patch
# must still work anywhere in the image); rotated placements are covered elsewhere.
UNIVERSAL = {"patch_size": 10, "eot": {"rotation_max_deg": 0}}


@pytest.fixture(scope="module")
def fitted_universal(lab):
    attack = create_attack("universal", steps=80, batch_size=32, progress=False, **UNIVERSAL)
    before = {k: v.clone() for k, v in lab.model.state_dict().items()}
    lab.model.train()
    attack.fit([lab.model], lab.train, CPU)
    assert lab.model.training  # mode and trainability restored
    assert all(p.requires_grad for p in lab.model.parameters())
    lab.model.eval()
    after = lab.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model was not trained
    return attack


def test_universal_patch_beats_random_noise(lab, fitted_universal):
    random = create_attack("random", progress=False, **UNIVERSAL)
    random.fit([], lab.train, CPU)
    learned = asr(lab, fitted_universal.perturb([lab.model], lab.images, lab.labels, CPU))
    noise = asr(lab, random.perturb([], lab.images, lab.labels, CPU))
    assert learned.n > 400 and noise.rate < 0.75 * learned.rate, (learned, noise)
    assert learned.ci[0] > noise.ci[1], (learned, noise)  # significantly better


def test_universal_perturb_is_deterministic_and_model_free(lab, fitted_universal):
    x, y = lab.images[:40], lab.labels[:40]
    first = fitted_universal.perturb([lab.model], x, y, CPU)
    assert torch.equal(first, fitted_universal.perturb([], x, y, CPU))
    # the first images' placements do not depend on how many images follow
    assert torch.equal(first[:10], fitted_universal.perturb([], x[:10], y[:10], CPU))
    clone = create_attack("universal", **UNIVERSAL)
    clone.load_state_dict(fitted_universal.state_dict())
    assert torch.equal(clone.perturb([], x, y, CPU), first)
    other_seed = create_attack("universal", seed=1, **UNIVERSAL)
    other_seed.load_state_dict(fitted_universal.state_dict())
    assert not torch.equal(other_seed.perturb([], x, y, CPU), first)
    rotated = create_attack("universal", eval_eot={"rotation_max_deg": 30}, **UNIVERSAL)
    rotated.load_state_dict(fitted_universal.state_dict())
    once = rotated.perturb([], x, y, CPU)
    assert not torch.equal(once, first) and torch.equal(rotated.perturb([], x, y, CPU), once)


def test_state_dict_checks(fitted_universal):
    state = fitted_universal.state_dict()
    assert set(state) == {"patch", "fit_curve"} and state["patch"].shape == (1, 10, 10)
    assert state["patch"].min() >= 0 and state["patch"].max() <= 1
    fresh = create_attack("universal", patch_size=8)
    with pytest.raises(ShapeError):
        fresh.load_state_dict(state)
    with pytest.raises(CorruptFileError):
        fresh.load_state_dict({"patch": torch.full((1, 8, 8), 2.0)})
    with pytest.raises(QuantpatchError, match="fit"):
        fresh.perturb([], torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), CPU)
    assert create_attack("patch-pgd").state_dict() == {}


def test_multibit_and_lavan_run_on_several_models(lab):
    twin = create_model("lenet", in_channels=1, num_classes=10, image_size=28)
    twin.load_state_dict(lab.model.state_dict())
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.9)  # a stand-in "other precision" of the same architecture
    small = Split(lab.train.images[:64], lab.train.labels[:64])
    multibit = create_attack("multibit", patch_size=6, steps=4, batch_size=16, progress=False)
    multibit.fit([lab.model, twin], small, CPU)
    assert multibit.patch is not None and multibit.patch.shape == (1, 6, 6)
    x, y = lab.images[:8], lab.labels[:8]
    lavan = create_attack("lavan", patch_size=6, location=(1, 2), steps=3, progress=False)
    lavan.fit([lab.model], small, CPU)
    assert only_box_changed(x, lavan.perturb([], x, y, CPU), 1, 2, 6)
    per_image = create_attack(
        "lavan", mode="per-image", patch_size=6, location=(20, 3), steps=3, progress=False
    )
    per_image.fit([lab.model], small, CPU)  # nothing to learn
    assert per_image.patch is None
    adversarial = per_image.perturb([lab.model, twin], x, y, CPU)
    assert only_box_changed(x, adversarial, 20, 3, 6) and not torch.equal(adversarial, x)


# ---------------------------------------------------------------------------- fit curves
def test_fit_curve_records_about_20_points_and_shows_learning(lab, fitted_universal):
    curve = fitted_universal.fit_curve  # 80 steps: one point per 4 steps
    assert [point.step for point in curve] == list(range(4, 81, 4))
    assert all(math.isfinite(p.loss) and 0 <= p.success <= 1 for p in curve)
    # untargeted: the loss (maximised) and the batch success both rise over the fit
    assert curve[-1].loss > curve[0].loss and curve[-1].success > curve[0].success + 0.1, curve
    odd = create_attack("universal", patch_size=6, steps=21, batch_size=4, progress=False)
    odd.fit([lab.model], Split(lab.train.images[:32], lab.train.labels[:32]), CPU)
    steps = [p.step for p in odd.fit_curve]  # every 2 steps, and the last one
    assert steps == [*range(2, 21, 2), 21]
    for p, images in zip(odd.fit_curve, [8] * 10 + [4], strict=True):  # steps x batch
        assert p.success * images == round(p.success * images)


def test_fit_curve_points_are_the_fit_loss_and_success(lab):
    """One training image at a fixed place with a vanishing step size: every point is the
    loss and outcome of (almost) the returned patch on that image."""
    image, label = lab.images[:1], lab.labels[:1]
    for targeted in (False, True):
        target = {"targeted": True, "target_class": int(label) ^ 1} if targeted else {}
        attack = create_attack("lavan", patch_size=9, steps=3, batch_size=5, lr=1e-9,
                               progress=False, **target)  # fmt: skip
        attack.fit([lab.model], Split(image, label), CPU)
        adv = apply_patch(image, attack.patch, Placement.fixed(1, 9, 9, 9))
        with torch.no_grad():
            logits = lab.model(adv)
        expected = F.cross_entropy(logits, attack.attack_labels(label)).item()
        hit = bool(logits.argmax(1) == attack.attack_labels(label))
        assert [p.step for p in attack.fit_curve] == [1, 2, 3]
        for point in attack.fit_curve:
            assert point.loss == pytest.approx(expected, rel=1e-4)
            assert point.success == float(hit if targeted else not hit)


def test_fit_curve_survives_state_dict_and_bad_curves_are_refused(fitted_universal, tmp_path):
    state = fitted_universal.state_dict()
    assert state["fit_curve"].shape == (20, 3) and state["fit_curve"].dtype == torch.float64
    save_tensors(tmp_path / "patch.safetensors", state, {})  # how the study caches fits
    clone = create_attack("universal", **UNIVERSAL)
    clone.load_state_dict(load_tensors(tmp_path / "patch.safetensors")[0])
    assert clone.fit_curve == fitted_universal.fit_curve
    clone.load_state_dict({"patch": state["patch"]})  # a state saved before curves existed
    assert clone.fit_curve == [] and "fit_curve" not in clone.state_dict()
    curve = state["fit_curve"]
    for bad, error in [(curve[:, :2], ShapeError), (curve.flip(0), CorruptFileError),
                       (curve + torch.tensor([0, 0, 1.5]), CorruptFileError),
                       (curve + torch.tensor([0.5, 0, 0]), CorruptFileError)]:  # fmt: skip
        with pytest.raises(error):
            clone.load_state_dict({"patch": state["patch"], "fit_curve": bad})
    assert create_attack("universal", steps=0).fit_curve == []


# ---------------------------------------------------------------------------- best fixed location
class CornerDetector(torch.nn.Module):
    """Class 1 once the top-left 8 x 8 pixels are bright on average, else class 0: only a
    patch overlapping that corner can fool it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x[:, :, :8, :8].mean(dim=(1, 2, 3)) - 0.3
        return torch.stack([-bright, bright], dim=1) * 20


def test_lavan_search_finds_the_only_vulnerable_position():
    dark = Split(torch.zeros(64, 1, 28, 28), torch.zeros(64, dtype=torch.long))
    params = {"patch_size": 8, "steps": 30, "batch_size": 8, "lr": 0.2, "progress": False}
    searched = create_attack("lavan", location="search", **params)
    searched.fit([CornerDetector()], dark, CPU)
    assert searched.searched_location == (3, 3)  # the grid position nearest the corner
    assert searched.eot.location == (3, 3) and searched.config()["location"] == "search"
    fixed = create_attack("lavan", location=(3, 3), **params)
    fixed.fit([CornerDetector()], dark, CPU)
    assert torch.equal(searched.patch, fixed.patch)  # the search only chose the place
    assert searched.fit_curve == fixed.fit_curve and searched.fit_curve[-1].success == 1.0
    x, y = dark.images[:4], dark.labels[:4]
    assert only_box_changed(x, searched.perturb([], x, y, CPU), 3, 3, 8)
    centre = create_attack("lavan", **params)
    centre.fit([CornerDetector()], dark, CPU)
    assert centre.fit_curve[-1].success == 0.0  # the centre cannot reach the corner

    state = searched.state_dict()
    assert state["location"].tolist() == [3, 3]
    restored = create_attack("lavan", location="search", **params)
    restored.load_state_dict(state)
    assert restored.searched_location == (3, 3)
    assert torch.equal(restored.perturb([], x, y, CPU), searched.perturb([], x, y, CPU))
    with pytest.raises(ShapeError):
        restored.load_state_dict({"patch": state["patch"]})  # where was it?
    with pytest.raises(ConfigError):
        create_attack("lavan", **params).load_state_dict(state)  # a fixed lavan
    with pytest.raises(ConfigError):
        create_attack("lavan", mode="per-image", location="search")


def test_lavan_search_beats_random_noise_and_matches_the_centre(lab):
    params = {"patch_size": 8, "steps": 30, "batch_size": 32, "progress": False}
    searched = create_attack("lavan", location="search", **params)
    searched.fit([lab.model], lab.train, CPU)
    centre = create_attack("lavan", location="center", **params)
    centre.fit([lab.model], lab.train, CPU)
    noise = create_attack("random", patch_size=8, eot={"rotation_max_deg": 0,
                                                        "location": searched.eot.location})  # fmt: skip
    found = asr(lab, searched.perturb([], lab.images, lab.labels, CPU))
    at_centre = asr(lab, centre.perturb([], lab.images, lab.labels, CPU))
    random = asr(lab, noise.perturb([], lab.images, lab.labels, CPU))
    assert found.rate >= at_centre.rate, (searched.searched_location, found, at_centre)
    assert found.ci[0] > random.ci[1], (found, random)
