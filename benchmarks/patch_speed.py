"""Universal-patch fitting speed: quantpatch vs IBM ART's AdversarialPatchPyTorch.

Both libraries optimise one patch for the same model, batch size, number of Adam steps,
learning rate and EOT ranges (random location, rotation, scale); we report fitting throughput
(steps x batch / wall time), its ratio, and each patch's untargeted ASR on the same held-out
images, both patches pasted by quantpatch at identical seeded placements. A third variant,
a bare forward+backward w.r.t. the input on a ready batch, is the floor for one step of the
model as given; ``bare_fast`` is the same pass on the BatchNorm-folded channels-last copy that
quantpatch's attacks run (``quantpatch.models.fast_frozen_copy``), so ``step_over_bare_fast``
isolates the cost of the paste and the optimiser.

Scale conventions differ: quantpatch's ``scale`` multiplies the nominal patch side ``p``;
ART first resizes its p x p patch to the image's shorter edge ``S`` and then scales it by
``im_scale``, so its pasted side is ``im_scale * S``. To paste the same sizes we pass ART
``scale = s * p / S`` for quantpatch's ``s`` (both draw the scale uniformly, so the side
length distributions match exactly).

Run: ``python benchmarks/patch_speed.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    CACHE,
    RESULTS,
    base_parser,
    bench_model,
    environment,
    interleaved,
    load1,
    measured,
    print_table,
    setup_threads,
    summary,
    wait_for_quiet,
    write_results,
)
from torch import nn

from quantpatch.attacks import create_attack
from quantpatch.data import Dataset
from quantpatch.metrics import attack_success
from quantpatch.models import fast_frozen_copy, predict_logits

ROTATION_DEG = 22.5  # ART's default
SCALE = (0.75, 1.25)  # x nominal patch side; ART gets the same pasted sides (module docstring)
LR = 0.05  # same Adam lr for both (ART's default 5.0 assumes a 0..255 pixel range)
EVAL_SEED = 1000  # placements of the ASR evaluation (the same for every patch)

# patch side per benchmark model (about 12 % of the image area: 10 px of 28, 11 px of 32)
PATCH = {"lenet": 10, "resnet20": 11}


def eot(scale: tuple[float, float]) -> dict[str, Any]:
    return {"rotation_max_deg": ROTATION_DEG, "scale_min": scale[0], "scale_max": scale[1]}


def quantpatch_fit(
    model: nn.Module, data: Dataset, p: int, steps: int, batch: int, seed: int, device
) -> torch.Tensor:
    attack = create_attack(
        "universal",
        patch_size=p,
        steps=steps,
        batch_size=batch,
        lr=LR,
        eot=eot(SCALE),
        seed=seed,
        progress=False,
    )
    attack.fit([model], data.train, device)
    return attack.patch


class ArtRunner:
    """ART's AdversarialPatchPyTorch on a PyTorchClassifier wrapping the same model, set up
    like quantpatch's fit; ``fit`` starts a fresh attack (patch, Adam state) every time."""

    def __init__(self, model: nn.Module, data: Dataset, p: int, batch: int, device) -> None:
        from art.estimators.classification import PyTorchClassifier

        _, c, h, w = data.train.images.shape
        side = min(h, w)
        self.data, self.batch = data, batch
        self.classifier = PyTorchClassifier(
            model=model,
            loss=nn.CrossEntropyLoss(),
            input_shape=(c, h, w),
            nb_classes=data.num_classes,
            clip_values=(0.0, 1.0),
            channels_first=True,
            device_type="gpu" if torch.device(device).type == "cuda" else "cpu",
        )
        self.kwargs = dict(
            rotation_max=ROTATION_DEG,
            scale_min=SCALE[0] * p / side,
            scale_max=SCALE[1] * p / side,
            learning_rate=LR,
            max_iter=1,  # one pass over x = steps batches (x holds steps * batch images)
            batch_size=batch,
            patch_shape=(c, p, p),
            patch_type="square",
            optimizer="Adam",
            targeted=False,
            verbose=False,
        )
        self.attack = None

    def stream(self, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The training stream quantpatch also uses: steps x batch train images drawn at
        random (ART walks it in order, one batch per step). Built outside the timed region."""
        gen = torch.Generator().manual_seed(seed)
        index = torch.randint(len(self.data.train), (steps * self.batch,), generator=gen)
        return self.data.train.images[index].numpy(), self.data.train.labels[index].numpy()

    def fit(self, x: np.ndarray, y: np.ndarray, seed: int) -> torch.Tensor:
        from art.attacks.evasion import AdversarialPatchPyTorch

        np.random.seed(seed)
        torch.manual_seed(seed)
        self.attack = AdversarialPatchPyTorch(self.classifier, **self.kwargs)
        patch, _ = self.attack.generate(x, y, shuffle=False)
        return torch.from_numpy(patch).float()


def bare_steps(model: nn.Module, data: Dataset, steps: int, batch: int, device) -> None:
    """``steps`` forward+backward passes w.r.t. the input on one ready batch: the floor."""
    x = data.train.images[:batch].to(device).requires_grad_(True)
    y = data.train.labels[:batch].to(device)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, x)


def evaluate(
    model: nn.Module, data: Dataset, patch: torch.Tensor, p: int, n_eval: int, device
) -> dict[str, Any]:
    """Untargeted ASR of ``patch`` on the first ``n_eval`` test images, pasted by quantpatch at
    seeded EOT placements (identical for every patch: same seed, same images)."""
    images, labels = data.test.images[:n_eval], data.test.labels[:n_eval]
    paster = create_attack(
        "universal", patch_size=p, eot=eot(SCALE), seed=EVAL_SEED, progress=False
    )
    paster.load_state_dict({"patch": patch.clamp(0, 1)})
    adv = paster.perturb([model], images, labels, device)
    clean = predict_logits(model, images, device).argmax(1)
    pred = predict_logits(model, adv, device).argmax(1)
    return attack_success(clean, pred, labels).to_dict()


def art_own_asr(attack: Any, model, data: Dataset, p: int, n_eval: int, device) -> dict:
    """ASR with ART's own ``apply_patch`` (random location/rotation, one fixed scale: the
    nominal side p), for reference: its placement distribution is not quantpatch's."""
    images, labels = data.test.images[:n_eval], data.test.labels[:n_eval]
    np.random.seed(EVAL_SEED)
    side = min(images.shape[-2:])
    adv = torch.from_numpy(attack.apply_patch(images.numpy(), scale=p / side)).float()
    clean = predict_logits(model, images, device).argmax(1)
    pred = predict_logits(model, adv, device).argmax(1)
    return attack_success(clean, pred, labels).to_dict()


def mean_rate(rates: list[dict[str, Any]]) -> float:
    return statistics.fmean(r["rate"] for r in rates)


def run_case(
    name: str,
    model: nn.Module,
    data: Dataset,
    acc: float,
    batch: int,
    steps: int,
    repeats: int,
    n_eval: int,
    dev: torch.device,
    art_unfrozen: bool = False,
) -> dict[str, Any]:
    """Time quantpatch, ART and the bare step interleaved; repeat r fits with seed r, so the
    ASR is a mean over ``repeats`` seeds (the work timed is the same for every seed)."""
    p = PATCH[name]
    runner = ArtRunner(model, data, p, batch, dev)
    streams = [runner.stream(steps, seed) for seed in range(repeats)]
    qp_patches: list[torch.Tensor] = []
    art_fits: list[tuple[torch.Tensor, Any]] = []  # (patch, ART attack object)
    bare_n = max(10, steps // 2)  # the per-step time of a plain loop settles quickly

    def qp(seed: int) -> None:
        qp_patches.append(quantpatch_fit(model, data, p, steps, batch, seed, dev))

    def art(seed: int) -> None:
        art_fits.append((runner.fit(*streams[seed], seed), runner.attack))

    def art_grads(seed: int) -> None:  # as usually called: autograd also fills weight grads
        model.requires_grad_(True)
        try:
            runner.fit(*streams[seed], seed)
        finally:
            model.requires_grad_(False)

    # Conservative for ART: its backward would also compute every weight gradient otherwise
    # (quantpatch freezes the weights itself); ``--art-unfrozen`` times that case too.
    model.requires_grad_(False)
    # warm-up: a few steps of each (allocator, thread pools, lazy imports, grid caches)
    quantpatch_fit(model, data, p, 3, batch, 0, dev)
    runner.fit(*runner.stream(3, 0), 0)
    bare_steps(model, data, 3, batch, dev)
    variants: dict[str, Callable[[int], None]] = {"quantpatch": qp, "art": art}
    if art_unfrozen:
        variants["art_unfrozen"] = art_grads
    variants["bare"] = lambda _seed: bare_steps(model, data, bare_n, batch, dev)
    fast = fast_frozen_copy(model)  # what quantpatch's attacks run (BatchNorm folded, NHWC)
    variants["bare_fast"] = lambda _seed: bare_steps(fast, data, bare_n, batch, dev)
    times = interleaved(variants, repeats, dev)
    result: dict[str, Any] = {
        "model": name,
        "dataset": data.name,
        "image_shape": list(data.train.images.shape[1:]),
        "clean_accuracy": acc,
        "patch_size": p,
        "batch_size": batch,
        "steps": steps,
        "bare_steps": bare_n,
        "repeats": repeats,
        "seeds": list(range(repeats)),
        "n_eval": n_eval,
    }
    for variant, runs in times.items():
        n_steps = bare_n if variant.startswith("bare") else steps
        stats = summary(runs)
        stats["images_per_s"] = n_steps * batch / stats["best_s"]
        stats["step_ms"] = 1000 * stats["best_s"] / n_steps
        stats["step_ms_median"] = 1000 * stats["median_s"] / n_steps
        result[variant] = stats
    qp_rate, art_rate = result["quantpatch"]["images_per_s"], result["art"]["images_per_s"]
    result["speedup_vs_art"] = qp_rate / art_rate
    result["step_over_bare"] = result["quantpatch"]["step_ms"] / result["bare"]["step_ms"]
    # the paste + optimiser overhead alone: the same pass on the copy the attack really runs
    result["step_over_bare_fast"] = result["quantpatch"]["step_ms"] / result["bare_fast"]["step_ms"]
    # the best quantpatch could do is the bare step of the model it runs: ART's time over it
    # caps the speedup
    result["max_speedup_vs_art"] = result["art"]["step_ms"] / result["bare_fast"]["step_ms"]
    if art_unfrozen:
        result["speedup_vs_art_unfrozen"] = qp_rate / result["art_unfrozen"]["images_per_s"]
    qp_asr = [evaluate(model, data, patch, p, n_eval, dev) for patch in qp_patches]
    art_asr = [evaluate(model, data, patch, p, n_eval, dev) for patch, _ in art_fits]
    art_own = [art_own_asr(attack, model, data, p, n_eval, dev) for _, attack in art_fits]
    result["quantpatch"].update(asr_mean=mean_rate(qp_asr), asr_per_seed=qp_asr)
    result["art"].update(
        asr_mean=mean_rate(art_asr),
        asr_per_seed=art_asr,
        asr_art_apply_mean=mean_rate(art_own),
        asr_art_apply_per_seed=art_own,
    )
    return result


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="default: 100 at batch <= 32, else 50"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="default: 3 at batch <= 32, else 2"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--models", nargs="+", default=list(PATCH), choices=list(PATCH))
    parser.add_argument(
        "--art-unfrozen", action="store_true", help="also time ART with weights requiring grad"
    )
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    device = torch.device(args.device)
    n_eval = 200 if args.quick else 1000
    env = environment(device, cores=cores)
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "patch_speed_vs_art.json")
    start = time.perf_counter()
    cases = []
    for name in args.models:
        model, data, acc = bench_model(name, device)
        for batch in args.batch_sizes:
            # waited for before every case: other jobs come and go on a shared machine
            quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
            load, case_start = load1(), time.perf_counter()
            small = batch <= 32  # ART's per-image loop makes big batches slow: fewer steps
            steps = args.steps or (10 if args.quick else 100 if small else 50)
            repeats = args.repeats or (1 if args.quick else 3 if small else 2)
            case = run_case(
                name, model, data, acc, batch, steps, repeats, n_eval, device, args.art_unfrozen
            )
            case["measured"] = measured(load, quiet, time.perf_counter() - case_start)
            cases.append(case)
            print(
                f"{name} b={batch}: qp {case['quantpatch']['images_per_s']:.0f} img/s, "
                f"ART {case['art']['images_per_s']:.0f} img/s, bare "
                f"{case['bare']['images_per_s']:.0f} img/s",
                flush=True,
            )
            save(out, env, cases, time.perf_counter() - start, args.merge or len(cases) > 1)
    report(cases)


def save(out: Path, env: dict, cases: list[dict], wall_s: float, merge: bool) -> None:
    """Written after every case, so an interrupted run keeps what it measured."""
    write_results(
        out,
        {
            "benchmark": "patch_speed_vs_art",
            "environment": env,
            "settings": {
                "steps": "per case (100 at batch 16, 50 at batch 128 by default)",
                "timing": "wall time of a whole fit (fit() / generate(), setup included), best "
                "of interleaved repeats (quantpatch, ART, bare, ...); repeat r uses seed r",
                "lr": LR,
                "optimizer": "Adam (both), patch clamped to [0, 1] after every step",
                "eot": {
                    "rotation_max_deg": ROTATION_DEG,
                    "scale_vs_patch_side": list(SCALE),
                    "art_scale": "scale_art = scale * patch_size / min(H, W) (same pasted sides)",
                    "location": "random (quantpatch: rotated patch fully inside; ART: unrotated "
                    "box inside)",
                },
                "patch_shape": "square",
                "asr": "untargeted, quantpatch.metrics.attack_success, mean over the repeats' "
                "seeds; every patch pasted by quantpatch's perturb at the same seeded EOT "
                "placements on the same test images. asr_art_apply: ART's own apply_patch "
                "(scale fixed at the nominal side), for reference",
                "goals": {"speedup_vs_art_min": 3.0, "step_over_bare_max": 1.3},
                "bare": "forward+backward w.r.t. the input of the model as given; bare_fast: "
                "the same on the BatchNorm-folded channels-last copy the attacks run",
            },
            "run_wall_s": wall_s,
            "results": cases,
        },
        key=("model", "batch_size"),
        merge=merge,
    )


def report(cases: list[dict[str, Any]]) -> None:
    rows = []
    for c in cases:
        rows.append(
            [
                c["model"],
                c["batch_size"],
                c["steps"],
                c["quantpatch"]["images_per_s"],
                c["art"]["images_per_s"],
                c["speedup_vs_art"],
                c["max_speedup_vs_art"],
                c["quantpatch"]["step_ms"],
                c["bare"]["step_ms"],
                c["step_over_bare"],
                c["step_over_bare_fast"],
                100 * c["quantpatch"]["asr_mean"],
                100 * c["art"]["asr_mean"],
                100 * c["art"]["asr_art_apply_mean"],
            ]
        )
    print_table(
        "Universal patch fit: quantpatch vs ART (goals: speedup >= 3, step/bare <= 1.3)",
        [
            "model",
            "batch",
            "steps",
            "qp img/s",
            "ART img/s",
            "speedup",
            "cap",
            "qp ms/step",
            "bare ms/step",
            "qp/bare",
            "qp/bare_fast",
            "qp ASR %",
            "ART ASR %",
            "ART ASR % (own paste)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
