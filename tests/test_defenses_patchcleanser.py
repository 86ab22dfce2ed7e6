"""PatchCleanser: mask coverage, the double-masking algorithm, certification and its guarantee."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantpatch.attacks import paste_at
from quantpatch.defenses import (
    DEFENSES,
    DefendedModel,
    PatchCleanser,
    create_defense,
    mask_set,
)
from quantpatch.defenses.patchcleanser import double_masking, majority
from quantpatch.errors import ConfigError, PatchTooLargeError, ShapeError

Box = tuple[int, int, int, int]


# ---------------------------------------------------------------- the mask set
def uncovered(image_hw: tuple[int, int], patch: int, boxes: Sequence[Box]) -> list[tuple]:
    """Every (top, left) patch placement that no mask box contains entirely (brute force)."""
    height, width = image_hw
    tops = torch.arange(height - patch + 1)[:, None, None]
    lefts = torch.arange(width - patch + 1)[None, :, None]
    t, x, h, w = (torch.tensor(v)[None, None, :] for v in zip(*boxes, strict=True))
    inside = (t <= tops) & (tops + patch <= t + h) & (x <= lefts) & (lefts + patch <= x + w)
    return [tuple(v) for v in (~inside.any(dim=2)).nonzero().tolist()]


@pytest.mark.parametrize(
    ("image_hw", "patch", "masks_per_axis", "stride"),
    [
        ((28, 28), 5, 6, None),
        ((28, 28), 7, 6, None),
        ((28, 28), 2, None, 5),
        ((32, 32), 11, 4, None),
        ((10, 13), 3, None, 2),
        ((16, 11), 4, 3, None),
        ((9, 9), 9, 3, None),
        ((12, 12), 1, 4, None),
        ((7, 20), 5, 1, None),
    ],
)
def test_mask_set_covers_every_placement(
    image_hw: tuple[int, int], patch: int, masks_per_axis: int | None, stride: int | None
) -> None:
    masks = mask_set(image_hw, patch, masks_per_axis, stride)
    assert uncovered(image_hw, patch, masks.boxes()) == []
    for n, size, starts in zip(image_hw, masks.size, (masks.tops, masks.lefts), strict=True):
        s = stride or -(-(n - patch + 1) // masks_per_axis)
        assert size == min(patch + s - 1, n)  # the paper's mask side m = p + s - 1
        assert starts[0] == 0 and starts[-1] == n - size and list(starts) == sorted(set(starts))
        if masks_per_axis is not None:
            assert len(starts) <= masks_per_axis
    keep = masks.keep()
    assert keep.shape == (len(masks), 1, *image_hw)
    assert [int((~k).sum()) for k in keep] == [masks.size[0] * masks.size[1]] * len(masks)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 18),
    st.integers(1, 18),
    st.integers(1, 18),
    st.one_of(st.tuples(st.integers(1, 8), st.none()), st.tuples(st.none(), st.integers(1, 8))),
)
def test_mask_set_covers_every_placement_property(
    height: int, width: int, patch: int, axis: tuple[int | None, int | None]
) -> None:
    if patch > min(height, width):
        with pytest.raises(PatchTooLargeError):
            mask_set((height, width), patch, *axis)
        return
    masks = mask_set((height, width), patch, *axis)
    assert uncovered((height, width), patch, masks.boxes()) == []


def test_mask_set_errors() -> None:
    with pytest.raises(ConfigError):
        mask_set((28, 28), 3)
    with pytest.raises(ConfigError):
        mask_set((28, 28), 3, 6, 2)
    with pytest.raises(PatchTooLargeError):
        PatchCleanser(9).mask_set((8, 8))
    with pytest.raises(PatchTooLargeError):
        PatchCleanser(9).predict(nn.Flatten(), torch.rand(1, 1, 8, 8))
    assert len(PatchCleanser(3).mask_set((28, 28))) == 36  # default: 6 masks per axis
    assert len(create_defense("patchcleanser", patch_size=3, stride=13).mask_set((28, 28))) == 4
    with pytest.raises(ShapeError):
        PatchCleanser(3).certify(nn.Flatten(), torch.rand(2, 1, 8, 8), torch.zeros(3))


# ---------------------------------------------------------------- the decision rule
@pytest.mark.parametrize(
    ("first", "agree", "expected"),
    [
        ([3, 3, 3], [True, False, False], 3),  # case I: agreement
        ([1, 1, 2, 1], [False, False, True, False], 2),  # case II: disagreer agrees
        ([1, 1, 2, 1], [False, False, False, False], 1),  # case III: majority
        ([1, 1, 2, 1], [True, True, False, True], 1),  # agreement of non-disagreers is moot
        ([1, 2, 3, 1, 1], [False, True, True, False, False], 2),  # the first such disagreer
        ([2, 1], [False, False], 1),  # a tied vote: the smallest label
    ],
)
def test_double_masking_cases(first: list[int], agree: list[bool], expected: int) -> None:
    out = double_masking(torch.tensor([first]), torch.tensor([agree]))
    assert out.tolist() == [expected]


def test_majority_per_row() -> None:
    labels = torch.tensor([[4, 2, 2], [0, 0, 9], [5, 5, 5]])
    assert majority(labels).tolist() == [2, 0, 5]


# ---------------------------------------------------------------- against a literal reference
def masked(image: torch.Tensor, boxes: Sequence[Box], value: float) -> torch.Tensor:
    out = image.clone()
    for top, left, height, width in boxes:
        out[:, top : top + height, left : left + width] = value
    return out


def reference(model: Callable, image: torch.Tensor, cleanser: PatchCleanser) -> tuple[int, dict]:
    """Algorithm 1 of Xiang et al. (2022), one image at a time, plus every two-mask label."""
    boxes = cleanser.mask_set(tuple(image.shape[-2:])).boxes()

    @functools.cache
    def label(*pair: int) -> int:
        x = masked(image, [boxes[i] for i in pair], cleanser.mask_value)
        with torch.no_grad():
            return int(model(x[None]).argmax(dim=1))

    first = [label(i) for i in range(len(boxes))]
    vote = min(set(first), key=lambda y: (-first.count(y), y))
    prediction = vote
    for r0, y0 in enumerate(first):
        if y0 != vote and len({label(min(r0, r1), max(r0, r1)) for r1 in range(len(boxes))}) == 1:
            prediction = y0
            break
    pairs = {(a, b): label(a, b) for a in range(len(boxes)) for b in range(a, len(boxes))}
    return prediction, pairs


def test_predict_and_certify_match_the_reference(mnist_lenet_fp32) -> None:
    ds, model = mnist_lenet_fp32
    clean, labels = ds.test.images[:4], ds.test.labels[:4]
    white = torch.ones(1, 6, 6)
    attacked = paste_at(clean, white, torch.tensor([2, 10, 20, 5]), torch.tensor([3, 12, 0, 18]))
    images = torch.cat([clean, attacked])
    cleanser = PatchCleanser(6, masks_per_axis=3, batch_size=7)  # chunks straddle images
    expected = [reference(model, image, cleanser) for image in images]
    assert cleanser.predict(model, images).tolist() == [p for p, _ in expected]
    pred, certified = cleanser.certify(model, clean, labels)
    assert pred.tolist() == [p for p, _ in expected[:4]]
    every_pair_right = [
        all(v == y for v in pairs.values())
        for (_, pairs), y in zip(expected[:4], labels.tolist(), strict=True)
    ]
    assert certified.tolist() == every_pair_right
    single = torch.cat([cleanser.predict(model, images[i : i + 1]) for i in range(len(images))])
    assert torch.equal(single, cleanser.predict(model, images))


def test_scores_argmax_is_the_label_and_grades_the_one_mask_wins(mnist_lenet_fp32) -> None:
    """What a query attack through the defence climbs: its argmax is double masking's label,
    and below the label's (M + 1) bonus each class has its count of one-mask wins."""
    ds, model = mnist_lenet_fp32
    clean = ds.test.images[:6]
    white = torch.ones(1, 6, 6)
    images = torch.cat([clean, paste_at(clean, white, torch.arange(6) * 3, torch.arange(6) * 2)])
    cleanser = PatchCleanser(6, masks_per_axis=3)
    scores = cleanser.scores(model, images, num_classes=10)
    labels = cleanser.predict(model, images)
    masks = len(cleanser.mask_set((28, 28)))
    assert torch.equal(scores.argmax(dim=1), labels)
    wins = scores - (masks + 1) * torch.nn.functional.one_hot(labels, 10)
    assert torch.equal(wins.sum(dim=1), torch.full((12,), float(masks)))
    assert (wins >= 0).all()
    assert cleanser.scores(model, images[:0], num_classes=10).shape == (0, 10)


# ---------------------------------------------------------------- the guarantee
class TinyMaxNet(nn.Module):
    """Global max pooling: one bright patch dominates, so patches flip it easily."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_max_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def every_placement(
    image: torch.Tensor, contents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``image`` with each of ``contents`` (K, C, p, p) pasted at every position: (images,
    tops, lefts), positions outer, contents inner."""
    k, _, p, _ = contents.shape
    height, width = image.shape[-2:]
    tops, lefts = torch.meshgrid(
        torch.arange(height - p + 1), torch.arange(width - p + 1), indexing="ij"
    )
    tops, lefts = tops.reshape(-1).repeat_interleave(k), lefts.reshape(-1).repeat_interleave(k)
    patches = contents.repeat(len(tops) // k, 1, 1, 1)
    return paste_at(image.expand(len(tops), -1, -1, -1), patches, tops, lefts), tops, lefts


def first_round_vote(
    model: Callable, images: torch.Tensor, cleanser: PatchCleanser
) -> torch.Tensor:
    """The majority of the one-mask labels (which a patch may win: double masking must still
    recover the true label of a certified image)."""
    keep = cleanser.mask_set(tuple(images.shape[-2:])).keep()
    with torch.no_grad():
        labels = [model(torch.where(k, images, cleanser.mask_value)).argmax(1) for k in keep]
    return majority(torch.stack(labels, dim=1))


def test_certified_tiny_model_is_never_flipped_by_any_patch() -> None:
    """Exhaustive on a small case: every 2x2 binary content (and random ones) at every
    position of 10x10 images never changes the prediction on a certified image, although
    the patch often wins the first-round vote."""
    torch.manual_seed(0)
    model = TinyMaxNet().eval()
    images = torch.rand(40, 1, 10, 10) * 0.6
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    cleanser = PatchCleanser(2, masks_per_axis=3)
    _, certified = cleanser.certify(model, images, labels)
    assert 0 < int(certified.sum()) < len(images)
    bits = torch.tensor([[(i >> b) & 1 for b in range(4)] for i in range(16)], dtype=torch.float32)
    contents = torch.cat([bits.view(16, 1, 2, 2), torch.rand(4, 1, 2, 2)])
    vote_won = 0
    for index in certified.nonzero().flatten()[:4].tolist():
        attacked, _, _ = every_placement(images[index], contents)
        vote_won += int((first_round_vote(model, attacked, cleanser) != labels[index]).sum())
        assert (cleanser.predict(model, attacked) == labels[index]).all()
    assert vote_won > 0


def patch_pgd_everywhere(
    model: nn.Module, image: torch.Tensor, label: int, patch: int, steps: int
) -> torch.Tensor:
    """Per-position patch PGD (signed gradient ascent on the cross-entropy, from a random
    start) at every placement at once: (positions, C, H, W) attacked images."""
    gen = torch.Generator().manual_seed(label)
    start = torch.rand(1, image.shape[0], patch, patch, generator=gen)
    attacked, tops, lefts = every_placement(image, start)
    contents = start.repeat(len(tops), 1, 1, 1)
    target = torch.full((len(tops),), label)
    for _ in range(steps):
        contents.requires_grad_(True)
        loss = F.cross_entropy(model(paste_at(attacked, contents, tops, lefts)), target)
        (grad,) = torch.autograd.grad(loss, contents)
        contents = (contents.detach() + 0.25 * grad.sign()).clamp(0, 1)
    return paste_at(attacked, contents, tops, lefts).detach()


@pytest.mark.slow
def test_certified_lenet_images_survive_an_attack_at_every_position(mnist_lenet_fp32) -> None:
    """The guarantee on the trained lenet: for certified test digits, a patch-PGD patch at
    every one of the (28 - 4 + 1)^2 positions never flips the double-masking prediction,
    although it flips the undefended lenet or wins the first-round vote at some of them."""
    ds, model = mnist_lenet_fp32
    patch = 4
    cleanser = PatchCleanser(patch, masks_per_axis=4)
    images, labels = ds.test.images[:60], ds.test.labels[:60]
    _, certified = cleanser.certify(model, images, labels)
    chosen = certified.nonzero().flatten()[:2].tolist()
    assert len(chosen) == 2, f"only {len(chosen)} of 60 digits certified"
    fooled = vote_won = 0
    for index in chosen:
        image, label = images[index], int(labels[index])
        attacked = patch_pgd_everywhere(model, image, label, patch, steps=10)
        with torch.no_grad():
            fooled += int((model(attacked).argmax(1) != label).sum())
        vote_won += int((first_round_vote(model, attacked, cleanser) != label).sum())
        assert (cleanser.predict(model, attacked) == label).all()
    assert fooled + vote_won > 0, "the attack never got anywhere: the check would be vacuous"


# ---------------------------------------------------------------- any predictor
@pytest.mark.slow
def test_patchcleanser_defends_ort_sessions_and_plain_callables(
    mnist_lenet_fp32, tmp_path: Path
) -> None:
    from quantpatch.quant.onnx import OrtModel, export_onnx, quantize_onnx_int8

    ds, model = mnist_lenet_fp32
    images, labels = ds.test.images[:6], ds.test.labels[:6]
    cleanser = PatchCleanser(5, masks_per_axis=3)
    expected = cleanser.certify(model, images, labels)
    fp32_path = export_onnx(model, tmp_path / "lenet.onnx", images[:2])
    ort = OrtModel(fp32_path)
    for predictor in (ort, lambda x: model(x)):
        pred, certified = cleanser.certify(predictor, images, labels)
        assert torch.equal(pred, expected[0]) and torch.equal(certified, expected[1])
    int8 = OrtModel(quantize_onnx_int8(fp32_path, tmp_path / "int8.onnx", ds.train.images[:128]))
    pred = cleanser.predict(int8, images)
    assert pred.shape == (6,) and (pred == labels).float().mean() >= 0.5
    jpeg = create_defense("jpeg")
    assert torch.equal(jpeg.predict(ort, images), jpeg.predict(model, images))
    assert DefendedModel(int8, jpeg)(images).shape == (6, 10)


def test_patchcleanser_is_registered() -> None:
    assert "patchcleanser" in DEFENSES
    cleanser = create_defense("patchcleanser", patch_size=4, masks_per_axis=5, mask_value=0.5)
    assert isinstance(cleanser, PatchCleanser) and "masks_per_axis=5" in repr(cleanser)
