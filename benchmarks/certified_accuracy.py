"""Certified accuracy of derandomized smoothing on mnist5k, per band, threshold and precision.

A zoo model with the 2C-channel ablation encoding (``create_ablation_model``) is trained on
column or block ablations (``--ablation``, ``RandomAblation``) for each band width; every
precision is built from it with the same transform (calibration, and QAT when asked). Each
model classifies every ablation of the test images once; the vote for each threshold and the
certificate for each patch side come from those softmax outputs (one set of forwards serves
the whole curve; the first setting is checked against ``DerandomizedSmoothing.certify``).
Beside them, the ceiling: the most test digits any base model could certify. Prints a table
and writes JSON with counts and 95 % Wilson intervals.

Run: ``python benchmarks/certified_accuracy.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _common import (
    CACHE,
    RESULTS,
    base_parser,
    environment,
    mnist,
    print_table,
    setup_threads,
    train_defence_model,
    write_results,
)

from quantpatch.defenses import (
    DerandomizedSmoothing,
    certify_counts,
    create_ablation_model,
    encode_ablation,
)
from quantpatch.errors import QuantpatchError
from quantpatch.metrics import Rate
from quantpatch.models import TrainConfig, predict_logits
from quantpatch.quant import QuantSpec
from quantpatch.quant.quantize import build_quantized


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--ablation", choices=["column", "block"], default="column")
    parser.add_argument("--bands", type=int, nargs="+", default=[2, 4], help="band (block) sides")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[2, 3, 5, 7])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "w8a8-ptq", "w4a4-ptq"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--n", type=int, default=1000, help="test images")
    parser.add_argument(
        "--train-images", type=int, help="a stratified subset of the training digits"
    )
    args = parser.parse_args()
    setup_threads(args.threads)
    device = torch.device(args.device)
    data = mnist()
    if args.train_images:
        data = replace(data, train=data.train.stratified(args.train_images, seed=0))
    n = 50 if args.quick else args.n
    epochs = 1 if args.quick else args.epochs
    images, labels = data.test.images[:n], data.test.labels[:n]
    name = "certified_accuracy" + ("" if args.ablation == "column" else f"_{args.ablation}")
    out = Path(args.out or (CACHE if args.quick else RESULTS) / f"{name}.json")
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for band in args.bands:
        smoothing = DerandomizedSmoothing(min(args.patch_sizes), args.ablation, band=band)
        model, train_s = trained(args.model, data, smoothing, epochs, device)
        for name in args.precisions:
            spec = QuantSpec.parse(name)
            built = time.perf_counter()
            target = build_quantized(model, spec, data.train, qat=TrainConfig(
                epochs=args.qat_epochs, lr=0.01, batch_size=128), device=device,
                progress=False, input_transform=smoothing.train_transform(1))  # fmt: skip
            build_s = time.perf_counter() - built
            voted = time.perf_counter()
            probabilities = ablation_probabilities(target, smoothing, images, device)
            vote_s = time.perf_counter() - voted
            check(smoothing, target, images, labels, probabilities, device)
            for threshold in args.thresholds:
                counts = (probabilities >= threshold).long().sum(dim=1)
                rows.append(row(args, band, spec.name, threshold, counts, labels, smoothing))
                rows[-1] |= {"train_s": train_s, "build_s": build_s, "vote_s": vote_s,
                             "epochs": epochs, "train_images": len(data.train)}  # fmt: skip
            report(rows[-len(args.thresholds) :], args.patch_sizes)
        ceilings = {
            str(p): ceiling(band, args.ablation, p, images, labels) for p in args.patch_sizes
        }
        for r in rows[-len(args.thresholds) * len(args.precisions) :]:
            r["ceiling"] = ceilings
        print(
            "ceiling %:", {p: round(100 * c["rate"], 1) for p, c in ceilings.items() if "rate" in c}
        )
    write_results(
        out,
        {
            "benchmark": "certified_accuracy",
            "environment": environment(device),
            "settings": {
                "dataset": data.name,
                "model": args.model,
                "ablation": args.ablation,
                "test_images": n,
                "train": {"epochs": epochs, "lr": 0.05, "batch_size": 64, "seed": 0},
                "qat": {"epochs": args.qat_epochs, "lr": 0.01, "batch_size": 128},
                "calibration": "mse on 1024 random-ablation train images",
            },
            "run_wall_s": time.perf_counter() - start,
            "results": rows,
        },
        key=("band", "precision", "threshold"),
        merge=args.merge,
    )


def trained(name: str, data, smoothing: DerandomizedSmoothing, epochs: int, device):
    """(2C model trained on random ablations of ``smoothing``, seconds)."""
    torch.manual_seed(0)
    model = create_ablation_model(name, in_channels=data.in_channels, num_classes=data.num_classes,
                                  image_size=data.image_size, mean=data.mean, std=data.std)  # fmt: skip
    return train_defence_model(model, data, epochs, device, smoothing.train_transform(0))


def ablation_probabilities(model, smoothing, images, device) -> torch.Tensor:
    """(N, A, K) softmax of ``model`` on every ablation of ``images``."""
    keep = smoothing.ablation_set(tuple(images.shape[-2:])).keep()
    chunks = []
    for start in range(0, len(images), 32):
        x = images[start : start + 32]
        encoded = encode_ablation(x.repeat_interleave(len(keep), 0), keep.repeat(len(x), 1, 1, 1))
        logits = predict_logits(model, encoded, device)
        chunks.append(logits.softmax(dim=1).view(len(x), len(keep), -1))
    return torch.cat(chunks)


def check(smoothing, model, images, labels, probabilities, device) -> None:
    """The shortcut agrees with the defence's own certify on a few images."""
    few = slice(0, 16)
    pred, certified = smoothing.certify(model, images[few], labels[few], device)
    counts = (probabilities[few] >= smoothing.threshold).long().sum(dim=1)
    ours, robust = certify_counts(counts, smoothing.delta(tuple(images.shape[-2:])))
    if not (torch.equal(ours, pred) and torch.equal(robust & (ours == labels[few]), certified)):
        raise RuntimeError("benchmark shortcut disagrees with DerandomizedSmoothing.certify")


def row(args, band, precision, threshold, counts, labels, smoothing) -> dict[str, Any]:
    image_hw = (28, 28)
    pred = counts.argmax(dim=1)
    clean = Rate(int((pred == labels).sum()), len(labels))
    certified = {}
    for p in args.patch_sizes:
        ablations = DerandomizedSmoothing(p, args.ablation, band=band).ablation_set
        try:
            delta = ablations(image_hw).affected(p)
        except QuantpatchError as exc:  # an uncertifiable size is reported, not fatal
            certified[str(p)] = {"error": str(exc)}
            continue
        prediction, robust = certify_counts(counts, delta)
        rate = Rate(int((robust & (prediction == labels)).sum()), len(labels))
        certified[str(p)] = {"delta": delta, **rate.to_dict()}
    return {
        "ablation": args.ablation,
        "band": band,
        "precision": precision,
        "threshold": threshold,
        "votes_per_image": len(smoothing.ablation_set(image_hw)),
        "clean": clean.to_dict(),
        "certified": certified,
    }


def ceiling(
    band: int, ablation: str, patch_size: int, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """The geometric ceiling at ``patch_size``: at most this share of the test digits can any
    base model certify (``DerandomizedSmoothing.ceiling``)."""
    try:
        smoothing = DerandomizedSmoothing(patch_size, ablation, band=band)
        bound = smoothing.ceiling(images, labels, num_classes=int(labels.max()) + 1)
    except QuantpatchError as exc:
        return {"error": str(exc)}
    return {"proven": bound.proven, **Rate(bound.most, bound.n).to_dict()}


def report(rows: list[dict[str, Any]], sizes: list[int]) -> None:
    title = (
        f"band {rows[0]['band']}, {rows[0]['precision']}: accuracy % (n={rows[0]['clean']['n']})"
    )
    print_table(
        title,
        ["threshold", "clean", *(f"cert {p}px" for p in sizes)],
        [
            [
                r["threshold"],
                100 * r["clean"]["rate"],
                *(100 * r["certified"][str(p)].get("rate", float("nan")) for p in sizes),
            ]
            for r in rows
        ],  # fmt: skip
    )


if __name__ == "__main__":
    main()
