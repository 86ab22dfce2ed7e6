"""What deterministic training costs: a training step pinned to TRAINING_THREADS vs the default.

One SGD training step (batch 128, cross-entropy, forward + backward + step) of lenet (28x28x1)
and resnet20 (32x32x3), in three settings, interleaved:

- ``default``: every core (``torch.set_num_threads(os.cpu_count())``), no determinism flags,
  what ``train_model`` did before pinning;
- ``deterministic-all-cores``: ``deterministic_training(threads=None)``: every core, with
  ``use_deterministic_algorithms(True, warn_only=True)``: the flags' own cost;
- ``pinned``: ``deterministic_training(threads=TRAINING_THREADS)``, what ``train_model`` does now.

Each timing is ``steps`` consecutive steps inside the setting's context; best and median of the
repeats. Random images: step time does not depend on the pixels.

Run: ``python benchmarks/training_determinism.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

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

from quantpatch.models import (
    TRAINING_THREADS,
    create_model,
    deterministic_training,
    training_numerics,
)

BATCH = 128
SHAPES = {"lenet": (1, 28), "resnet20": (3, 32)}
SETTINGS = {
    "default": lambda: contextlib.nullcontext(),
    "deterministic-all-cores": lambda: deterministic_training(threads=None),
    "pinned": lambda: deterministic_training(threads=TRAINING_THREADS),
}


def step_function(arch: str, steps: int, setting: str) -> Callable[[int], None]:
    """``steps`` training steps of ``arch`` inside ``setting``'s context (one call = one timing)."""
    channels, size = SHAPES[arch]
    torch.manual_seed(0)
    model = create_model(arch, in_channels=channels, num_classes=10, image_size=size).train()
    images, labels = torch.rand(BATCH, channels, size, size), torch.randint(10, (BATCH,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run(_: int = 0) -> None:
        with SETTINGS[setting]():
            for _ in range(steps):
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    return run


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per timing")
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    device = torch.device("cpu")
    repeats = args.repeats or (2 if args.quick else 7)
    steps = args.steps or (1 if args.quick else 5)
    results = []
    for arch in SHAPES:
        quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
        start_load, started = load1(), time.perf_counter()
        variants = {setting: step_function(arch, steps, setting) for setting in SETTINGS}
        for run in variants.values():  # warm-up
            run()
        times = interleaved(variants, repeats, device)
        wall = time.perf_counter() - started
        default = min(times["default"]) / steps
        for setting, runs in times.items():
            per_step = [t / steps for t in runs]
            results.append({
                "arch": arch, "setting": setting, "batch": BATCH, "steps_per_timing": steps,
                "threads": TRAINING_THREADS if setting == "pinned" else cores,
                **summary(per_step), "x_default": round(min(per_step) / default, 2),
                **measured(start_load, quiet, wall),
            })  # fmt: skip
    print_table(
        f"one training step, batch {BATCH}, CPU ({cores} cores; best of {repeats} x {steps} steps)",
        ["model", "setting", "threads", "best ms", "median ms", "x default"],
        [
            [
                r["arch"],
                r["setting"],
                r["threads"],
                1000 * r["best_s"],
                1000 * r["median_s"],
                r["x_default"],
            ]
            for r in results
        ],  # fmt: skip
    )
    write_results(
        args.out or RESULTS / "training_determinism.json",
        {
            "benchmark": "training_determinism",
            "environment": environment(device, cores=cores, numerics=training_numerics()),
            "settings": {"batch": BATCH, "repeats": repeats, "steps_per_timing": steps},
            "results": results,
        },
        key=("arch", "setting"),
        merge=args.merge,
    )


if __name__ == "__main__":
    main()
