"""What the training defences cost against plain QAT: time per step and peak memory.

One training step (batch 128, SGD, LSQ scales learning) of plain QAT of one w2a2 resnet20,
interleaved with one step of each recipe training fp32, w4a4 and w2a2 at once, each with the
parameters studies/qa-defences.yaml trains it with (so the cost priced is the one measured).
Two ratios per recipe: against one plain w2a2 QAT step, and against plain QAT of both
quantized precisions (two steps: what plain QAT needs to give the same two quantized models). Peak memory: each variant runs its steps in a fresh subprocess, reporting
the growth of its peak resident set over its set-up (CPU, Linux) or torch's peak allocation (CUDA).
TriQDef reports 1.47-1.60x the time of plain QAT.

Run: ``python benchmarks/qat_recipe_cost.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    RESULTS,
    base_parser,
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

from quantpatch.data import load_dataset
from quantpatch.defenses.training import create_recipe
from quantpatch.models import create_model
from quantpatch.quant import FP32, QuantSpec, calibrate, quantize, set_learnable
from quantpatch.quant.quantize import param_groups
from quantpatch.quant.switchable import SwitchablePrecision
from quantpatch.study import load_study

BATCH = 128
SPECS = [FP32, QuantSpec.parse("w4a4"), QuantSpec.parse("w2a2")]
PLAIN = "plain-qat-w2a2"
STUDY = Path(__file__).resolve().parents[1] / "studies" / "qa-defences.yaml"


@functools.cache
def study_recipes() -> dict[str, dict]:
    """Each recipe of the study this prices, by label, with its parameters (read once)."""
    return {r.label: {"name": r.name, **r.params} for r in load_study(STUDY).recipes}


def build(variant: str, device: torch.device):
    """(model, step function) of one variant, calibrated and ready to train."""
    data = load_dataset("mnist5k")
    torch.manual_seed(0)
    base = create_model("resnet20", in_channels=1, num_classes=10, image_size=28,
                        mean=data.mean, std=data.std)  # fmt: skip
    images, labels = data.train.images[:BATCH].to(device), data.train.labels[:BATCH].to(device)
    if variant == PLAIN:
        model = quantize(base, SPECS[-1]).to(device)
        calibrate(model, images, "minmax", device)

        def loss() -> torch.Tensor:
            return F.cross_entropy(model(images), labels)
    else:
        members = {}
        for spec in SPECS:
            members[spec.name] = quantize(base, spec).to(device)
            if not spec.is_float:
                calibrate(members[spec.name], images, "minmax", device)
        model = SwitchablePrecision(members)
        params = dict(study_recipes()[variant])
        recipe = create_recipe(params.pop("name"), **params)

        def loss() -> torch.Tensor:
            return recipe.loss(model, images, labels)

    set_learnable(model, True)
    model.train()
    optimizer = torch.optim.SGD(param_groups(model), lr=0.01, momentum=0.9)

    def step(_: int = 0) -> None:
        value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    return model, step


def peak_memory_mb(variant: str, steps: int, device: str) -> float:
    """Peak memory growth of ``steps`` training steps, in a fresh process."""
    code = (
        "import sys, json; sys.path.insert(0, 'benchmarks'); import qat_recipe_cost as b; "
        f"print(json.dumps(b.child({variant!r}, {steps}, {device!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def child(variant: str, steps: int, device: str) -> float:
    setup_threads(None)
    device_ = torch.device(device)
    _, step = build(variant, device_)
    if device_.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    for _ in range(steps):
        step()
    return (_status_kb("VmHWM") - before) / 1024


def _status_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 7)
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
    start_load, started = load1(), time.perf_counter()
    variants = [PLAIN, *study_recipes()]
    steps = {name: build(name, device)[1] for name in variants}
    for step in steps.values():  # warm-up
        step()
    times = interleaved(steps, repeats, device)
    plain = min(times[PLAIN])
    memory = {name: peak_memory_mb(name, 2 if args.quick else 3, args.device) for name in variants}
    results = []
    for name in variants:
        best = min(times[name])
        results.append({
            "variant": name, "threads": torch.get_num_threads(), **summary(times[name]),
            "x_plain_step": round(best / plain, 2),
            "x_plain_both_precisions": round(best / (2 * plain), 2),
            "peak_memory_growth_mb": round(memory[name], 1),
            "x_plain_memory": round(memory[name] / memory[PLAIN], 2) if memory[PLAIN] else None,
        })  # fmt: skip
    wall = time.perf_counter() - started
    for row in results:
        row.update(measured(start_load, quiet, wall))
    print_table(
        f"training step, resnet20 28px, batch {BATCH} (best of {repeats})",
        ["variant", "best s", "x plain step", "x plain w4a4+w2a2", "peak MB", "x plain MB"],
        [
            [
                r["variant"],
                round(r["best_s"], 3),
                r["x_plain_step"],
                r["x_plain_both_precisions"],
                r["peak_memory_growth_mb"],
                r["x_plain_memory"],
            ]
            for r in results
        ],  # fmt: skip
    )
    env = environment(device, cores=cores)
    write_results(
        args.out or RESULTS / "qat_recipe_cost.json",
        {
            "benchmark": "qat_recipe_cost",
            "environment": env,
            "settings": {
                "batch": BATCH,
                "precisions": [s.name for s in SPECS],
                "repeats": repeats,
                "recipes": study_recipes(),
                "plain": "one w2a2 QAT step of one resnet20",
            },  # fmt: skip
            "run_wall_s": wall,
            "results": results,
        },
        key=("variant", "threads"),
        merge=args.merge,
    )


if __name__ == "__main__":
    main()
