"""Query-only attacks (sparse-rs, sparse-rs-universal) and the generative one (gap), on the
attack tests' trained LeNet (``lab``), a gradient-free lambda and an ONNX Runtime session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantpatch.attacks import create_attack
from quantpatch.errors import ConfigError
from quantpatch.metrics import attack_outcomes, attack_success, mcnemar_exact
from quantpatch.models import predict_logits

CPU = torch.device("cpu")
# No rotation: a patch that must work anywhere, as in test_attacks.py's universal comparison.
UNIVERSAL = {"patch_size": 10, "eot": {"rotation_max_deg": 0}}


class Counting:
    """A black box: logits of ``model`` without any autograd record, counting the images it
    is asked about (and checking that it is queried in inference mode)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.images, self.calls = model, 0, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert torch.is_inference_mode_enabled()
        self.images, self.calls = self.images + len(images), self.calls + 1
        with torch.no_grad():
            return self.model(images).detach()


def predictions(model, images: torch.Tensor) -> torch.Tensor:
    return predict_logits(model, images, CPU).argmax(1)


def box_sides(clean: torch.Tensor, adversarial: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per image: number of changed pixels, and the height and width of the box holding them."""
    changed = (adversarial != clean).any(1)  # (N, H, W)
    rows, cols = changed.any(2), changed.any(1)

    def span(hit: torch.Tensor) -> torch.Tensor:
        index = torch.arange(hit.shape[1]).expand_as(hit)
        first = torch.where(hit, index, hit.shape[1]).amin(1)
        last = torch.where(hit, index, -1).amax(1)
        return (last - first + 1).clamp(min=0)

    return changed.flatten(1).sum(1), span(rows), span(cols)


def test_sparse_rs_budget_is_exact_and_stops_at_success(lab):
    x, y = lab.images[:16], lab.labels[:16]
    # a hard target keeps several images searching until the budget runs out; 3 candidates
    # per forward do not divide the 23 queries left after the first one
    box = Counting(lab.model)
    attack = create_attack("sparse-rs", patch_size=4, queries=24, candidates=3, targeted=True,
                           target_class=3, progress=False)  # fmt: skip
    adversarial = attack.perturb([box], x, y, CPU)
    used = attack.queries_used
    assert used.shape == (16,) and used.dtype == torch.long
    assert int(used.min()) >= 1 and int(used.max()) == 24
    assert box.images == int(used.sum())  # every evaluated image was counted, nothing more
    assert box.calls == 1 + 8  # the first query, then 7 rounds of 3 and one of 2
    pred = predictions(lab.model, adversarial)
    stopped = used < 24
    assert stopped.any() and (pred[stopped] == 3).all()  # stopped early = a real success


def test_sparse_rs_on_a_gradient_free_callable_changes_only_the_box(lab):
    x, y = lab.images[:24], lab.labels[:24]
    attack = create_attack("sparse-rs", patch_size=6, queries=60, progress=False)
    model_grads = [p.requires_grad for p in lab.model.parameters()]
    adversarial = attack.perturb([Counting(lab.model)], x, y, CPU)
    assert adversarial.shape == x.shape and adversarial.min() >= 0 and adversarial.max() <= 1
    changed, height, width = box_sides(x, adversarial)
    assert changed.max() <= 36 and height.max() <= 6 and width.max() <= 6
    assert (changed > 0).all()  # every image carries its patch
    assert [p.requires_grad for p in lab.model.parameters()] == model_grads


def test_sparse_rs_is_deterministic_for_a_seed(lab):
    x, y = lab.images[:12], lab.labels[:12]
    runs = []
    for seed in (5, 5, 6):
        attack = create_attack("sparse-rs", patch_size=5, queries=40, seed=seed, progress=False)
        runs.append((attack.perturb([lab.model], x, y, CPU), attack.queries_used))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_sparse_rs_reaches_a_high_asr(lab):
    x, y = lab.images[:48], lab.labels[:48]
    attack = create_attack("sparse-rs", patch_size=8, queries=500, progress=False)
    adversarial = attack.perturb([lab.model], x, y, CPU)
    rate = attack_success(lab.clean[:48], predictions(lab.model, adversarial), y)
    assert rate.n >= 35 and rate.rate >= 0.9, rate
    assert float(attack.queries_used.float().mean()) < 500  # most stopped well before


def test_targeted_sparse_rs_counts_only_non_target_images(lab):
    x, y = lab.images[:32], lab.labels[:32]
    attack = create_attack("sparse-rs", patch_size=8, queries=300, targeted=True,
                           target_class=3, progress=False)  # fmt: skip
    adversarial = attack.perturb([lab.model], x, y, CPU)
    rate = attack_success(lab.clean[:32], predictions(lab.model, adversarial), y, target=3)
    eligible = (lab.clean[:32] == y) & (y != 3)  # clean-correct and not already the target
    assert rate.n == int(eligible.sum()) < int((y != 3).sum()) and rate.rate >= 0.5, rate


def test_query_attacks_reject_gradient_settings_and_bad_budgets():
    for bad in ({"steps": 5}, {"lr": 0.1}, {"queries": 0}, {"candidates": 0}, {"p_init": 0}):
        with pytest.raises(ConfigError):
            create_attack("sparse-rs", **bad)
    with pytest.raises(ConfigError):
        create_attack("sparse-rs-universal", steps=0)
    images, labels = torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError):
        create_attack("sparse-rs", progress=False).perturb([], images, labels, CPU)
    ten_classes = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    attack = create_attack(
        "sparse-rs", patch_size=3, targeted=True, target_class=12, progress=False
    )
    with pytest.raises(ConfigError, match="target_class 12"):
        attack.perturb([ten_classes], images, labels, CPU)


def test_sparse_rs_on_an_onnx_runtime_int8_session(lab, tmp_path: Path):
    from quantpatch.quant.onnx import OrtModel, export_onnx, quantize_onnx_int8

    fp32 = export_onnx(lab.model, tmp_path / "lenet.onnx", lab.images[:2])
    session = OrtModel(quantize_onnx_int8(fp32, tmp_path / "int8.onnx", lab.train.images[:64]))
    x, y = lab.images[:32], lab.labels[:32]
    attack = create_attack("sparse-rs", patch_size=8, queries=200, progress=False)
    adversarial = attack.perturb([session], x, y, CPU)
    clean, attacked = predictions(session, x), predictions(session, adversarial)
    stopped = attack.queries_used < 200
    assert stopped.any() and (attacked[stopped] != y[stopped]).all()  # re-evaluated: real
    rate = attack_success(clean, attacked, y)
    assert rate.rate >= 0.8, rate


def test_sparse_rs_universal_counts_its_queries_and_pastes_like_universal(lab):
    box = Counting(lab.model)
    attack = create_attack("sparse-rs-universal", steps=30, batch_size=24, progress=False,
                           **UNIVERSAL)  # fmt: skip
    attack.fit([box], lab.train, CPU)
    assert attack.queries_used == 30 * 24 == box.images and box.calls == 30
    patch = attack.state_dict()["patch"]
    assert patch.shape == (1, 10, 10) and set(patch.unique().tolist()) <= {0.0, 1.0}
    twin = create_attack("sparse-rs-universal", steps=30, batch_size=24, **UNIVERSAL)
    twin.fit([lab.model], lab.train, CPU)  # the same search through a module
    assert torch.equal(twin.state_dict()["patch"], patch)
    x, y = lab.images[:8], lab.labels[:8]
    fixed = create_attack("sparse-rs-universal", eval_eot={"location": (3, 4)}, **UNIVERSAL)
    fixed.load_state_dict(attack.state_dict())
    adversarial = fixed.perturb([], x, y, CPU)
    assert torch.equal(adversarial[:, :, 3:13, 4:14], patch.expand(8, -1, -1, -1))


def test_gap_patch_beats_random_noise(lab):
    random = create_attack("random", progress=False, **UNIVERSAL)
    random.fit([], lab.train, CPU)
    gap = create_attack("gap", steps=60, lr=0.01, batch_size=32, progress=False, **UNIVERSAL)
    rng = torch.get_rng_state()
    gap.fit([lab.model], lab.train, CPU)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded from the attack's own stream
    counted, learned = attack_outcomes(
        lab.clean, predictions(lab.model, gap.perturb([], lab.images, lab.labels, CPU)), lab.labels
    )
    _, noise = attack_outcomes(
        lab.clean,
        predictions(lab.model, random.perturb([], lab.images, lab.labels, CPU)),
        lab.labels,
    )
    # significantly better on the same images (paired, one-sided exact McNemar)
    test = mcnemar_exact(learned[counted], noise[counted])
    assert test.p_greater < 0.01, (
        test,
        learned[counted].float().mean(),
        noise[counted].float().mean(),
    )
    clone = create_attack("gap", **UNIVERSAL)
    clone.load_state_dict(gap.state_dict())
    x, y = lab.images[:16], lab.labels[:16]
    assert torch.equal(clone.perturb([], x, y, CPU), gap.perturb([], x, y, CPU))


class OwnThreads(Counting):
    """A black box that, like an integer runtime, runs on its own thread pool; it records
    how many threads torch had while the attack asked it."""

    own_thread_pool = True

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.torch_threads: set[int] = set()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.torch_threads.add(torch.get_num_threads())
        return super().__call__(images)


def test_query_attacks_on_runtimes_do_their_own_work_on_one_torch_thread(lab):
    """Against a runtime with its own threads, the attack's tensor work runs on one torch
    thread (torch's spinning workers would take the runtime's cores); the thread count is
    restored and the adversarial images are the ones the full thread count gives. Against
    a torch model, torch keeps all its threads."""
    x, y = lab.images[:24], lab.labels[:24]
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, params in (("sparse-rs", {"queries": 60}), ("square-linf", {"queries": 30})):
            runtime = OwnThreads(lab.model)
            attack = create_attack(name, **params, progress=False)
            on_runtime = attack.perturb([runtime], x, y, CPU)
            assert runtime.torch_threads == {1} and torch.get_num_threads() == 2, name
            reference = attack.perturb([Counting(lab.model)], x, y, CPU)
            assert torch.equal(on_runtime, reference), name
        universal = OwnThreads(lab.model)
        create_attack("sparse-rs-universal", steps=8, batch_size=16, **UNIVERSAL,
                      progress=False).fit([universal], lab.train, CPU)  # fmt: skip
        assert universal.torch_threads == {1} and torch.get_num_threads() == 2
        module = torch.nn.Sequential(lab.model)  # a torch model among the targets
        seen: set[int] = set()
        module.register_forward_pre_hook(lambda *_: seen.add(torch.get_num_threads()))
        create_attack("sparse-rs", queries=20, progress=False).perturb([module], x, y, CPU)
        assert seen == {2}
    finally:
        torch.set_num_threads(saved)
