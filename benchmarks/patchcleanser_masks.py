"""Where PatchCleanser starts to certify on mnist5k: certified accuracy over masks per axis and
patch side, in front of a plain model and of models trained on that mask set's own masks.

Two masks of PatchCleanser's set can remove a large share of a 28 px digit (two 12x12 masks
remove up to 37 %), so its certificate depends on how many masks there are per axis (smaller
masks) and on the patch side (each mask covers a patch of that side). One plain model (trained
on whole images) is certified at every (masks per axis, patch side); a certifiable model is
trained per pair on up to two random masks of that pair's mask set
(``PatchCleanser.train_transform``), as a study's ``certifiable: true`` does. Prints the two
grids and writes JSON with counts and 95 % Wilson intervals.

Run: ``python benchmarks/patchcleanser_masks.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import time
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

from quantpatch.defenses import PatchCleanser
from quantpatch.errors import QuantpatchError
from quantpatch.metrics import Rate
from quantpatch.models import create_model


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--masks", type=int, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[2, 3, 5, 7])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n", type=int, default=500, help="test images")
    args = parser.parse_args()
    setup_threads(args.threads)
    device = torch.device(args.device)
    data = mnist()
    n, epochs = (40, 1) if args.quick else (args.n, args.epochs)
    images, labels = data.test.images[:n], data.test.labels[:n]
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "patchcleanser_masks.json")
    start = time.perf_counter()
    plain, _ = trained(args.model, data, None, epochs, device)
    rows: list[dict[str, Any]] = []
    for masks in args.masks:
        for size in args.patch_sizes:
            try:
                cleanser = PatchCleanser(size, masks_per_axis=masks)
                cleanser.check_image_size(tuple(images.shape[-2:]))
            except QuantpatchError as exc:  # a pair this image cannot take is reported
                rows.append({"masks_per_axis": masks, "patch_size": size, "error": str(exc)})
                continue
            certifiable, train_s = trained(args.model, data, cleanser, epochs, device)
            rows.append({
                "masks_per_axis": masks, "patch_size": size,
                "mask_set": cleanser.method(tuple(images.shape[-2:])),
                "plain": certified(cleanser, plain, images, labels, device),
                "certifiable": certified(cleanser, certifiable, images, labels, device)
                | {"train_s": round(train_s, 1)},
            })  # fmt: skip
            print(f"masks {masks}, {size} px: {rows[-1]['mask_set']}", flush=True)
    for kind in ("plain", "certifiable"):
        report(rows, kind, args.masks, args.patch_sizes)
    write_results(
        out,
        {
            "benchmark": "patchcleanser_masks",
            "environment": environment(device),
            "settings": {
                "dataset": data.name,
                "model": args.model,
                "test_images": n,
                "train": {"epochs": epochs, "lr": 0.05, "batch_size": 64, "seed": 0},
                "train_images": len(data.train),
                "mask_value": 0.0,
            },  # fmt: skip
            "run_wall_s": round(time.perf_counter() - start, 1),
            "results": rows,
        },
        key=("masks_per_axis", "patch_size"),
        merge=args.merge,
    )


def trained(name: str, data, cleanser: PatchCleanser | None, epochs: int, device):
    """(model trained on whole images, or on ``cleanser``'s random masks; seconds)."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=data.in_channels, num_classes=data.num_classes,
                         image_size=data.image_size, mean=data.mean, std=data.std)  # fmt: skip
    transform = cleanser.train_transform(0) if cleanser is not None else None
    return train_defence_model(model, data, epochs, device, transform)


def certified(cleanser: PatchCleanser, model, images, labels, device) -> dict[str, Any]:
    """Defended clean and certified accuracy, and the certification time."""
    started = time.perf_counter()
    pred, robust = cleanser.certify(model, images, labels, device)
    return {
        "clean": Rate(int((pred == labels).sum()), len(labels)).to_dict(),
        "certified": Rate(int(robust.sum()), len(labels)).to_dict(),
        "certify_s": round(time.perf_counter() - started, 2),
    }


def report(rows: list[dict[str, Any]], kind: str, masks: list[int], sizes: list[int]) -> None:
    by_pair = {(r["masks_per_axis"], r["patch_size"]): r for r in rows}

    def cell(m: int, p: int) -> str:
        r = by_pair[(m, p)]
        if "error" in r:
            return "–"
        return f"{100 * r[kind]['certified']['rate']:.1f} ({100 * r[kind]['clean']['rate']:.0f})"

    print_table(f"{kind} model: certified % (defended clean %), n={rows[0].get(kind, {}).get('clean', {}).get('n')}",
                ["masks/axis", *(f"{p} px" for p in sizes)],
                [[m, *(cell(m, p) for p in sizes)] for m in masks])  # fmt: skip


if __name__ == "__main__":
    main()
