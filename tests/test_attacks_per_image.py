"""Per-image attacks on the shared trained LeNet: what they keep, and how strong they are."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantpatch.attacks import create_attack

CPU = torch.device("cpu")


def correct_test_images(mnist_lenet_fp32, n):
    data, model = mnist_lenet_fp32
    x, y = data.test.images[: 2 * n], data.test.labels[: 2 * n]
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    return model, x[correct][:n], y[correct][:n]


def loss_and_success(model, adversarial, labels):
    with torch.no_grad():
        logits = model(adversarial)
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(1) != labels


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("pgd-linf", {"eps": 0.2, "steps": 20}),
        ("patch-pgd", {"patch_size": 10, "steps": 20, "restarts": 2}),
    ],
)
def test_full_budget_keeps_the_strongest_success(mnist_lenet_fp32, name, params):
    """By default every step and restart runs and each image keeps its highest-loss success;
    ``early_stop`` returns the first success, just past the boundary."""
    model, x, y = correct_test_images(mnist_lenet_fp32, 8)
    results = {
        early: loss_and_success(
            model,
            create_attack(name, seed=1, early_stop=early, progress=False, **params).perturb(
                [model], x, y, CPU
            ),
            y,
        )
        for early in (True, False)
    }
    (loss_early, hit_early), (loss_full, hit_full) = results[True], results[False]
    assert hit_early.all() and hit_full.all()
    assert (loss_full >= loss_early - 1e-4).all()
    assert loss_full.mean() > loss_early.mean() + 1.0


def test_patch_pgd_searches_the_placement(mnist_lenet_fp32):
    """A 10 px patch on 28 px digits: one start at a random place fools ~80 %; probing a grid
    of places first and continuing at the best fools nearly all, for a similar budget."""
    model, x, y = correct_test_images(mnist_lenet_fp32, 48)
    attack = create_attack("patch-pgd", patch_size=10, steps=20, restarts=1, progress=False)
    adversarial = attack.perturb([model], x, y, CPU)
    changed = (adversarial != x).flatten(1)
    rows, cols = (adversarial != x)[:, 0].any(2), (adversarial != x)[:, 0].any(1)
    assert changed.sum(1).max() <= 100 and rows.sum(1).max() <= 10 and cols.sum(1).max() <= 10
    _, fooled = loss_and_success(model, adversarial, y)
    assert fooled.float().mean() >= 0.95, fooled.float().mean()


@pytest.mark.parametrize(
    ("steps", "rounds"), [(50, [2, 3, 23]), (100, [4, 6, 46]), (10, [1, 1, 5])]
)
def test_patch_pgd_search_spends_its_step_budget(mnist_lenet_fp32, steps, rounds):
    """Successive halving (9 positions, the best 3, the best one) spends ``steps`` gradient
    passes per image, probes included; each round also evaluates where it ends (9 + 3 + 1
    forwards). Tiny budgets keep 45 % of ``steps`` for the chosen position."""
    model, x, y = correct_test_images(mnist_lenet_fp32, 4)
    attack = create_attack("patch-pgd", patch_size=7, steps=steps, progress=False)
    assert attack._round_steps() == rounds
    passes = 9 * rounds[0] + 3 * rounds[1] + rounds[2]
    assert passes == steps or steps < 25
    seen = []
    hook = model.register_forward_hook(lambda _m, inputs, _out: seen.append(len(inputs[0])))
    try:
        attack.perturb([model], x, y, CPU)
    finally:
        hook.remove()
    assert sum(seen) == len(x) * (passes + 9 + 3 + 1)
