"""What certified smoothing costs: certification throughput and certifiable training time.

1. Certification: ``DerandomizedSmoothing.certify`` (which builds and encodes every ablation on
   the fly, then votes) against plain batched inference of the same ablated images, encoded
   beforehand, through the same 2C-channel model; the goal is a ratio (plain time / certify
   time) of at least 0.8: the vote costs nothing beyond its forwards. Column ablation (one
   forward per image column) and block ablation (one per pixel).
2. Training: one epoch of ``train_model`` on the same images, plain (C-channel model) against
   certifiable training with ``RandomAblation`` (2C-channel model; also against the same model
   on ablations encoded beforehand, which isolates the transform) and with PatchCleanser's
   ``RandomMasks``.

Models are freshly initialised (seeded): costs do not depend on the weights. Run:
``python benchmarks/certify_throughput.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    CACHE,
    RESULTS,
    base_parser,
    environment,
    interleaved,
    load1,
    measured,
    mnist,
    print_table,
    setup_threads,
    summary,
    wait_for_quiet,
    write_results,
)

from quantpatch.data import Split
from quantpatch.defenses import (
    DerandomizedSmoothing,
    PatchCleanser,
    create_ablation_model,
    encode_ablation,
)
from quantpatch.models import TrainConfig, create_model, predict_logits, train_model

GOAL = 0.8
BATCH = 1024  # ablated images per forward, for certify and for plain inference alike
SETUPS = {  # ablation -> (band, patch side, images certified per repeat)
    "column": (4, 5, 64),
    "block": (8, 2, 4),
}
TRAIN_IMAGES = 2048
MASKS = {"patch_size": 5, "masks_per_axis": 4}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--model", default="lenet", help="zoo model (default: lenet)")
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 5)
    env = environment(device, cores=cores)
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "certify_throughput.json")
    data = mnist()
    start = time.perf_counter()
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
    load, case_start = load1(), time.perf_counter()
    row: dict[str, Any] = {"model": args.model, "threads": torch.get_num_threads()}
    row["dataset"] = data.name
    row["certification"] = [
        certification(args.model, data, ablation, device, repeats, args.quick)
        for ablation in SETUPS
    ]
    n_train = 256 if args.quick else TRAIN_IMAGES
    row["training"] = training(args.model, data, n_train, device, repeats)
    row["measured"] = measured(load, quiet, time.perf_counter() - case_start)
    report(row)
    write_results(
        out,
        {
            "benchmark": "certify_throughput",
            "environment": env,
            "settings": {
                "repeats": repeats,
                "batch_size": BATCH,
                "setups": {
                    k: dict(zip(("band", "patch_size", "images"), v, strict=True))
                    for k, v in SETUPS.items()
                },  # fmt: skip
                "train_images": n_train,
                "patchcleanser": MASKS,
                "timing": "warm-up, then variants interleaved; certification: certify() vs "
                "predict_logits on the same ablations encoded before timing, same batch size; "
                "training: one epoch of train_model (batch 128), fresh seeded model per repeat",
                "ratio": "plain time / certify time (median of repeats)",
                "goal_ratio_min": GOAL,
            },
            "run_wall_s": time.perf_counter() - start,
            "results": [row],
        },
        key=("model", "threads"),
        merge=args.merge,
    )


def ablation_model(name: str, data, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_ablation_model(
        name,
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
    )


def certification(
    name: str, data, ablation: str, device: torch.device, repeats: int, quick: bool
) -> dict[str, Any]:
    """``certify`` vs ``predict_logits`` on the same ablations, encoded beforehand."""
    band, patch, n = SETUPS[ablation]
    n = max(1, n // 4) if quick else n
    smoothing = DerandomizedSmoothing(patch, ablation, band=band, batch_size=BATCH)
    model = ablation_model(name, data).to(device).eval()
    images, labels = data.test.images[:n], data.test.labels[:n]
    keep = smoothing.ablation_set(tuple(images.shape[-2:])).keep()
    prebuilt = encode_ablation(images.repeat_interleave(len(keep), 0), keep.repeat(n, 1, 1, 1))

    def certify(_: int) -> None:
        smoothing.certify(model, images, labels, device)

    def plain(_: int) -> None:
        predict_logits(model, prebuilt, device, batch_size=BATCH)

    certify(0), plain(0)  # warm-up
    times = interleaved({"certify": certify, "plain": plain}, repeats, device)
    ratios = [p / c for p, c in zip(times["plain"], times["certify"], strict=True)]
    evaluations = len(prebuilt)
    return {
        "ablation": ablation,
        "band": band,
        "patch_size": patch,
        "images": n,
        "ablations_per_image": len(keep),
        "evaluations": evaluations,
        "certify_images_per_s": n / statistics.median(times["certify"]),
        "plain_images_per_s": n / statistics.median(times["plain"]),
        "plain_ablated_images_per_s": evaluations / statistics.median(times["plain"]),
        "throughput_ratio_median": statistics.median(ratios),
        "meets_goal": statistics.median(ratios) >= GOAL,
        "certify": summary(times["certify"]),
        "plain": summary(times["plain"]),
    }


def training(name: str, data, n: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Seconds per epoch of ``n`` images: plain, ablation (on the fly and prebuilt), masks."""
    split = Split(data.train.images[:n], data.train.labels[:n])
    config = TrainConfig(epochs=1, lr=0.05, batch_size=128)
    smoothing = DerandomizedSmoothing(5, "column", band=4)
    cleanser = PatchCleanser(**MASKS)
    prebuilt = Split(smoothing.train_transform(0)(split.images), split.labels)

    def plain_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model(name, in_channels=data.in_channels, num_classes=data.num_classes,
                            image_size=data.image_size, mean=data.mean, std=data.std)  # fmt: skip

    def run(model: torch.nn.Module, train: Split, transform: Any = None) -> None:
        train_model(model, train, config, device, False, input_transform=transform)

    variants = {
        "plain": lambda r: run(plain_model(), split),
        "ablation": lambda r: run(ablation_model(name, data), split, smoothing.train_transform(r)),
        "ablation_prebuilt": lambda r: run(ablation_model(name, data), prebuilt),
        "masks": lambda r: run(plain_model(), split, cleanser.train_transform(r)),
    }
    for fn in variants.values():
        fn(0)  # warm-up
    times = interleaved(variants, repeats, device)
    base = statistics.median(times["plain"])
    return {
        "images": n,
        "epoch_s": {k: summary(v) for k, v in times.items()},
        "cost_vs_plain_median": {k: statistics.median(v) / base for k, v in times.items()},
        "transform_overhead_median": statistics.median(times["ablation"])
        / statistics.median(times["ablation_prebuilt"]),
    }


def report(row: dict[str, Any]) -> None:
    print_table(
        f"{row['model']}: smoothing certification vs plain inference (goal >= {GOAL})",
        ["ablation", "images", "evaluations", "certify img/s", "plain img/s", "ratio", "goal"],
        [
            [
                c["ablation"],
                c["images"],
                c["evaluations"],
                c["certify_images_per_s"],
                c["plain_images_per_s"],
                c["throughput_ratio_median"],
                "yes" if c["meets_goal"] else "NO",
            ]
            for c in row["certification"]
        ],  # fmt: skip
    )
    train = row["training"]
    print_table(
        f"{row['model']}: one training epoch of {train['images']} images (median s)",
        ["variant", "epoch s", "x plain"],
        [[k, v["median_s"], train["cost_vs_plain_median"][k]] for k, v in train["epoch_s"].items()],
    )
    print(f"ablation transform overhead: {train['transform_overhead_median']:.3f}x")


if __name__ == "__main__":
    main()
