"""Per-image patch PGD with placement search: today's successive halving vs the former probe.

``patch-pgd`` searches where each image's patch goes. Until commit ab127ca it probed all 9
positions of a 3 x 3 grid for ``steps / 10`` steps each and then gave the best one ``steps``
more minus the probe (steps 50: 9 x 5 + 45 = 90 forward/backward passes per image). It now runs
successive halving inside ``steps`` (9 x 2, best 3 x 3, best one 23 more: 50 passes).
``Former`` below is that former schedule on today's code (it reproduces commit ab127ca's
patch-pgd bit for bit; checked when this script was written).

Both run on trained lenet (28 px) and resnet20 (32 px, 3 channels) at fp32 and w2a2 (LSQ QAT,
2 epochs), crafted on each in turn with the study's defaults (steps 50, batch 32, 7 px patch),
interleaved, seeds 0..repeats-1. Reported: images/s (best and median), white-box ASR on the
source and transfer ASR to the other precision, each with n and its 95 % Wilson interval, and
an exact McNemar test of the two schedules on the same images (seed 0). Goal: >= 2x the
former images/s at equal ASR (intervals overlapping). torchattacks and ART have no per-image
patch attack with a placement search to compare with (ART's patches are universal).

Run: ``python benchmarks/patch_pgd_speed.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    BENCH_MODELS,
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
    wait_for_quiet,
    write_results,
)
from torch import nn

from quantpatch._io import content_key
from quantpatch.attacks.patch_pgd import PatchPGD
from quantpatch.errors import QuantpatchError
from quantpatch.metrics import Rate, attack_outcomes, mcnemar_exact
from quantpatch.models import TrainConfig, load_checkpoint, save_checkpoint
from quantpatch.quant import QuantSpec, build_quantized, quantize

GOAL = 2.0
QAT = TrainConfig(epochs=2, lr=0.05)


class Former(PatchPGD):
    """patch-pgd's placement search as it was up to commit ab127ca: every grid position for
    ceil(steps / 10) steps, then the best one for the rest of ``steps`` on top of the probe."""

    halving = ((9, 10),)

    def _round_steps(self) -> list[int]:
        probe = min(self.steps, -(-self.steps // 10))
        return [probe, self.steps - probe]


def w2a2_of(name: str, fp32: nn.Module, data: Any, device: torch.device) -> nn.Module:
    """The LSQ-QAT w2a2 model built from ``fp32``, cached under runs/.bench-cache."""
    spec = QuantSpec.parse("w2a2")
    fp32_setup = BENCH_MODELS[name]  # what trained ``fp32`` (bench_model)
    key = content_key(
        {"model": name, "data": data.name, "fp32": fp32_setup, "qat": QAT.model_dump()}
    )
    path = CACHE / f"{name}-w2a2-{key}.safetensors"
    model = quantize(fp32, spec)
    try:
        load_checkpoint(path, model)
    except QuantpatchError:
        model = build_quantized(fp32, spec, data.train, qat=QAT, device=device, progress=False)
        save_checkpoint(path, model, {"qat": QAT.model_dump()})
    return model.to(device).eval()


def predictions(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(b.to(device)).argmax(1).cpu() for b in images.split(256)])


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet20"])
    parser.add_argument("--n", type=int, default=None, help="test images (default 300)")
    parser.add_argument("--repeats", type=int, default=None, help="seeds per schedule (2)")
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    device = torch.device(args.device)
    n = args.n or (32 if args.quick else 300)
    repeats = args.repeats or (1 if args.quick else 2)
    steps = 10 if args.quick else 50
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "patch_pgd_speed.json")
    env = environment(device, cores=cores)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for name in args.models:
        fp32, data, _ = bench_model(name, device)
        models = {"fp32": fp32, "w2a2": w2a2_of(name, fp32, data, device)}
        x, y = data.test.images[:n], data.test.labels[:n]
        clean = {p: predictions(m, x, device) for p, m in models.items()}
        for source in models:
            quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
            load, case_start = load1(), time.perf_counter()
            adv = craft_both(models[source], x, y, device, steps, repeats)
            times = adv.pop("times")
            row = case_row(name, source, n, steps, times, adv, models, clean, x, y, device)
            row["measured"] = measured(load, quiet, time.perf_counter() - case_start)
            results.append(row)
            print(f"{name} {source}: x{row['speedup_median']:.2f} images/s", flush=True)
            data_out = {"benchmark": "patch_pgd_speed", "environment": env, "goal": GOAL,
                        "repeats": repeats, "results": results,
                        "wall_s": round(time.perf_counter() - start, 1)}  # fmt: skip
            write_results(out, data_out, ("model", "source"), args.merge or len(results) > 1)
    print_table(
        f"patch-pgd, placement search, steps {steps}, batch 32, 7 px (goal >= {GOAL}x images/s)",
        [
            "model",
            "source",
            "former img/s",
            "halving img/s",
            "speedup",
            "ASR former",
            "ASR halving",
            "McNemar p",
        ],  # fmt: skip
        [
            [
                r["model"],
                r["source"],
                r["former"]["images_per_s_median"],
                r["halving"]["images_per_s_median"],
                r["speedup_median"],
                r["former"]["asr"][r["source"]]["text"],
                r["halving"]["asr"][r["source"]]["text"],
                r["mcnemar_seed0"][r["source"]]["p_two_sided"],
            ]  # fmt: skip
            for r in results
        ],
    )


def craft_both(model, x, y, device, steps: int, repeats: int) -> dict[str, Any]:
    """Both schedules' examples per seed (interleaved), and their wall times under "times"."""
    adv: dict[str, Any] = {"former": [], "halving": []}
    settings = {"patch_size": 7, "steps": steps, "batch_size": 32, "progress": False}

    def run(kind: str, seed: int) -> None:
        attack = (Former if kind == "former" else PatchPGD)(**settings, seed=seed)
        adv[kind].append(attack.perturb([model], x, y, device))

    adv["times"] = interleaved({k: (lambda r, k=k: run(k, r)) for k in adv}, repeats, device)
    return adv


def case_row(name, source, n, steps, times, adv, models, clean, x, y, device) -> dict[str, Any]:
    """Timings, ASR per target (seed-0 outcomes and every seed's rate) and McNemar, per case."""
    row: dict[str, Any] = {"model": name, "source": source, "n_images": n, "steps": steps}
    outcomes: dict[str, dict[str, torch.Tensor]] = {}
    for kind, runs in times.items():
        per_seed: dict[str, list[dict[str, Any]]] = {}
        for examples in adv[kind]:
            for target, model in models.items():
                counted, fooled = attack_outcomes(
                    clean[target], predictions(model, examples, device), y
                )
                rate = Rate(int(fooled.sum()), int(counted.sum()))
                per_seed.setdefault(target, []).append({**rate.to_dict(), "text": str(rate)})
                outcomes.setdefault(kind, {}).setdefault(target, fooled[counted])
        row[kind] = {
            "runs_s": [round(t, 3) for t in runs],
            "images_per_s_median": n / statistics.median(runs),
            "images_per_s_best": n / min(runs),
            "asr": {t: rates[0] for t, rates in per_seed.items()},
            "asr_per_seed": per_seed,
        }
    row["speedup_median"] = statistics.median(times["former"]) / statistics.median(times["halving"])
    row["mcnemar_seed0"] = {
        t: mcnemar_exact(outcomes["halving"][t], outcomes["former"][t]).to_dict() for t in models
    }
    row["meets_goal"] = row["speedup_median"] >= GOAL and all(
        r["p_two_sided"] > 0.05 for r in row["mcnemar_seed0"].values()
    )
    return row


if __name__ == "__main__":
    main()
