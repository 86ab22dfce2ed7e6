"""square-linf, apgd-ce and apgd-dlr (torchattacks behind quantpatch's interface) against
torchattacks called directly, on the attack tests' trained LeNet (``lab``)."""

from __future__ import annotations

import sys

import pytest
import torch

from quantpatch.attacks import ATTACKS, create_attack
from quantpatch.errors import ConfigError, MissingDependencyError
from quantpatch.metrics import attack_success
from quantpatch.models import predict_logits

torchattacks = pytest.importorskip(
    "torchattacks", reason="torchattacks is not installed (pip install --no-deps torchattacks)"
)

CPU = torch.device("cpu")
EPS, N = 0.1, 48
SQUARE_EPS, QUERIES = 0.15, 50  # enough successes at a test-sized budget


def correct_images(lab, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images the model gets right: every one is eligible for ASR."""
    right = lab.clean == lab.labels
    return lab.images[right][:n], lab.labels[right][:n]


def asr(lab, adversarial: torch.Tensor, labels: torch.Tensor):
    """ASR on ``correct_images``: every image is clean-correct, so the labels are the clean
    predictions."""
    return attack_success(labels, predict_logits(lab.model, adversarial, CPU).argmax(1), labels)


def assert_same_rate(ours, reference) -> None:
    """Each rate inside the other's 95 % interval, and the attack did something."""
    assert reference.ci[0] <= ours.rate <= reference.ci[1], (ours, reference)
    assert ours.ci[0] <= reference.rate <= ours.ci[1], (ours, reference)
    assert ours.successes > 0, ours


def assert_in_ball(adversarial: torch.Tensor, clean: torch.Tensor, eps: float) -> None:
    assert (adversarial - clean).abs().max() <= eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1


@pytest.mark.parametrize("name,loss", [("apgd-ce", "ce"), ("apgd-dlr", "dlr")])
def test_apgd_reaches_the_reference_asr(lab, name, loss):
    x, y = correct_images(lab)
    ours = create_attack(name, eps=EPS, steps=10, batch_size=32, progress=False)
    adversarial = ours.perturb([lab.model], x, y, CPU)
    assert_in_ball(adversarial, x, EPS)
    reference = torchattacks.APGD(lab.model, norm="Linf", eps=EPS, steps=10, loss=loss, seed=0)
    assert_same_rate(asr(lab, adversarial, y), asr(lab, reference(x, y), y))


class BlackBox:
    """A plain callable: logits without autograd, counting the images it is asked about."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.images = model, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        self.images += len(images)
        return self.model(images)


def test_square_through_a_plain_callable_reaches_the_reference_asr(lab):
    x, y = correct_images(lab)
    box = BlackBox(lab.model)
    ours = create_attack("square-linf", eps=SQUARE_EPS, queries=QUERIES, progress=False)
    adversarial = ours.perturb([box], x, y, CPU)
    assert_in_ball(adversarial, x, SQUARE_EPS)
    assert N < box.images <= N * (QUERIES + 3)  # a check, the start, the search, a recheck
    reference = torchattacks.Square(
        lab.model, norm="Linf", eps=SQUARE_EPS, n_queries=QUERIES, seed=0
    )
    assert_same_rate(asr(lab, adversarial, y), asr(lab, reference(x, y), y))


def test_targeted_square_changes_only_images_it_sends_to_the_target(lab):
    x, y = correct_images(lab, 16)
    x, y = x[y != 3], y[y != 3]
    attack = create_attack("square-linf", eps=0.3, queries=20, targeted=True, target_class=3,
                           progress=False)  # fmt: skip
    predicted = predict_logits(lab.model, attack.perturb([lab.model], x, y, CPU), CPU).argmax(1)
    assert (predicted == 3).any() and ((predicted == 3) | (predicted == y)).all()


@pytest.mark.parametrize(
    "name,params", [("apgd-ce", {"steps": 3}), ("square-linf", {"queries": 10})]
)
def test_seeded_batched_and_leaves_the_global_random_state_alone(lab, name, params):
    x, y = correct_images(lab, 16)
    runs = []
    for seed in (5, 5, 6):
        # a large eps: some images are fooled (an unfooled one comes back clean, seed or not)
        attack = create_attack(name, eps=0.3, seed=seed, batch_size=8, progress=False, **params)
        state = torch.get_rng_state()
        runs.append(attack.perturb([lab.model], x, y, CPU))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_declared_kinds_and_defaults():
    for name in ("square-linf", "apgd-ce", "apgd-dlr"):
        cls = ATTACKS.get(name)
        assert cls.kind == "pixel" and not cls.universal
    assert not ATTACKS.get("square-linf").needs_gradients  # the study's query-only check
    assert ATTACKS.get("apgd-ce").needs_gradients and ATTACKS.get("apgd-dlr").needs_gradients
    config = create_attack("apgd-dlr", eps=0.1).config()
    assert config == {"eps": 0.1, "steps": 100, "restarts": 1, "rho": 0.75, "batch_size": 128,
                      "seed": 0, "progress": True}  # fmt: skip


@pytest.mark.parametrize(
    "name,params",
    [
        ("square-linf", {"eps": 0}),
        ("square-linf", {"eps": -0.1}),
        ("square-linf", {"queries": 0}),
        ("square-linf", {"p_init": 0}),
        ("square-linf", {"restarts": 0}),
        ("square-linf", {"steps": 10}),  # a query attack has no gradient steps
        ("square-linf", {"patch_size": 8}),
        ("square-linf", {"targeted": True}),  # no target_class
        ("apgd-ce", {"eps": 0}),
        ("apgd-ce", {"steps": 0}),
        ("apgd-ce", {"rho": 1}),
        ("apgd-ce", {"lr": 0.1}),
        ("apgd-ce", {"targeted": True}),  # torchattacks' APGD is untargeted only
        ("apgd-dlr", {"restarts": 0}),
    ],
)
def test_bad_parameters_are_refused(name, params):
    with pytest.raises(ConfigError):
        create_attack(name, **params)


def test_bad_sources_are_refused():
    images, labels = torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    ten = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    two = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with pytest.raises(ConfigError, match="one source model"):
        create_attack("apgd-ce", progress=False).perturb([ten, ten], images, labels, CPU)
    with pytest.raises(ConfigError, match="one source model"):
        create_attack("square-linf", progress=False).perturb([ten, ten], images, labels, CPU)
    with pytest.raises(ConfigError, match="differentiable"):
        create_attack("apgd-ce", progress=False).perturb([lambda t: ten(t)], images, labels, CPU)
    with pytest.raises(ConfigError, match="3 classes"):
        create_attack("apgd-dlr", progress=False).perturb([two], images, labels, CPU)
    targeted = create_attack("square-linf", targeted=True, target_class=12, progress=False)
    with pytest.raises(ConfigError, match="target_class 12"):
        targeted.perturb([ten], images, labels, CPU)


def test_missing_torchattacks_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import now raises ImportError
    for name in ("square-linf", "apgd-ce"):
        with pytest.raises(MissingDependencyError, match="pip install --no-deps 'torchattacks"):
            create_attack(name)
