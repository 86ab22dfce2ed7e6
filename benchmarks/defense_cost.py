"""What defences cost: per-image latency of each defence and PatchCleanser's certification.

1. Latency: every input defence (default parameters) alone and in front of the model, and
   PatchCleanser's ``predict`` (model included), at batch 1 and 128; per image, best of the
   interleaved repeats, next to the undefended model.
2. Certification throughput: ``PatchCleanser.certify`` (which builds every two-mask image on
   the fly) against plain batched inference of the same masked images built beforehand; the
   goal is a ratio (plain time / certify time) of at least 0.8.
3. Certified accuracy of the briefly trained benchmark models at a few patch sizes (a quality
   figure, not a speed one: these models were never trained with masks).

Run: ``python benchmarks/defense_cost.py`` (``--quick`` for a smoke test).
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

from quantpatch.defenses import DEFENSES, InputDefense, PatchCleanser
from quantpatch.models import predict_logits

GOAL = 0.8
BATCHES = (1, 128)
PATCH = 7  # the study's default patch side
MASKS_PER_AXIS = 6  # the paper's default
CERT_IMAGES = {"lenet": 24, "resnet20": 8}  # x 666 two-mask images each
SWEEP = {"lenet": ((3, 5, 7), 100), "resnet20": ((7,), 20)}  # patch sides, images
INPUT_DEFENSES = [n for n in DEFENSES.names() if issubclass(DEFENSES.get(n), InputDefense)]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CERT_IMAGES), choices=list(CERT_IMAGES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-sweep", action="store_true", help="skip the certified accuracy")
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 5)
    env = environment(device, cores=cores)
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "defense_cost.json")
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for name in args.models:
        model, data, acc = bench_model(name, device)
        quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
        load, case_start = load1(), time.perf_counter()
        row: dict[str, Any] = {"model": name, "threads": torch.get_num_threads()}
        row |= {"dataset": data.name, "clean_accuracy": acc}
        row["latency"] = latency(model, data.test.images, device, repeats)
        n_cert = 8 if args.quick else CERT_IMAGES[name]
        row["certification"] = certification(
            model, data.test.images[:n_cert], data.test.labels[:n_cert], device, repeats
        )
        if not args.no_sweep:
            sizes, n = SWEEP[name]
            n = 16 if args.quick else n
            row["certified_accuracy"] = sweep(
                model, data.test.images[:n], data.test.labels[:n], sizes, device
            )
        row["measured"] = measured(load, quiet, time.perf_counter() - case_start)
        results.append(row)
        report(row)
        save(
            out, env, repeats, results, time.perf_counter() - start, args.merge or len(results) > 1
        )


def latency(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, repeats: int
) -> list[dict[str, Any]]:
    """Per-image seconds of each defence alone ("transform") and with the model ("defended"),
    and of the undefended model, at each batch size (calls repeated to last >= 0.2 s).
    PatchCleanser's predict, far slower (36 masks plus second rounds), is timed apart with at
    most 2 repeats."""
    cases = []
    cleanser = PatchCleanser(PATCH, masks_per_axis=MASKS_PER_AXIS)
    for batch in BATCHES:
        x = images[:batch].to(device)
        variants = {"none/defended": lambda x=x: predict_logits(model, x, device)}
        for name in INPUT_DEFENSES:
            defense = DEFENSES.get(name)().to(device)
            variants[f"{name}/transform"] = lambda x=x, d=defense: _no_grad(d, x)
            variants[f"{name}/defended"] = lambda x=x, d=defense: d.predict(model, x, device)
        calls = {key: _calls_for(fn, 0.2) for key, fn in variants.items()}
        timed = {key: _repeated(fn, calls[key]) for key, fn in variants.items()}
        times = interleaved(timed, repeats, device)

        def cleanse(_: int, x: torch.Tensor = x) -> None:
            cleanser.predict(model, x, device)

        cleanse(0)  # warm-up
        slow = interleaved({"pc": cleanse}, min(repeats, 2), device)
        times["patchcleanser/defended"] = slow["pc"]
        calls["patchcleanser/defended"] = 1
        for key, runs in times.items():
            defense, what = key.split("/")
            per_image = [t / (calls[key] * batch) for t in runs]
            cases.append({"defense": defense, "what": what, "batch": batch, **summary(per_image)})
    return cases


def certification(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """``certify`` vs ``predict_logits`` on the same two-mask images, built beforehand."""
    cleanser = PatchCleanser(PATCH, masks_per_axis=MASKS_PER_AXIS)
    masks = cleanser.mask_set(tuple(images.shape[-2:]))
    keep = masks.keep()
    first, second = torch.triu_indices(len(keep), len(keep))
    pairs = keep[first] & keep[second]
    prebuilt = torch.where(pairs[None], images[:, None], cleanser.mask_value).flatten(0, 1)
    evaluations = len(prebuilt)

    def certify(_: int) -> None:
        cleanser.certify(model, images, labels, device)

    def plain(_: int) -> None:
        predict_logits(model, prebuilt, device, batch_size=cleanser.batch_size).argmax(dim=1)

    certify(0)  # warm-up
    plain(0)
    times = interleaved({"certify": certify, "plain": plain}, min(repeats, 3), device)
    ratios = [p / c for p, c in zip(times["plain"], times["certify"], strict=True)]
    return {
        "patch_size": PATCH,
        "masks_per_axis": MASKS_PER_AXIS,
        "masks": len(masks),
        "mask_size": list(masks.size),
        "images": len(images),
        "evaluations": evaluations,
        "batch_size": cleanser.batch_size,
        "certify_images_per_s": evaluations / min(times["certify"]),
        "plain_images_per_s": evaluations / min(times["plain"]),
        "throughput_ratio_median": statistics.median(ratios),
        "throughput_ratio_best": max(ratios),
        "meets_goal": statistics.median(ratios) >= GOAL,
        "certify": summary(times["certify"]),
        "plain": summary(times["plain"]),
    }


def sweep(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sizes: tuple[int, ...],
    device: torch.device,
) -> list[dict[str, Any]]:
    """Clean (double-masking) and certified accuracy of ``model`` at each patch side."""
    rows = []
    for patch in sizes:
        cleanser = PatchCleanser(patch, masks_per_axis=MASKS_PER_AXIS)
        pred, certified = cleanser.certify(model, images, labels, device)
        masks = cleanser.mask_set(tuple(images.shape[-2:]))
        rows.append(
            {
                "patch_size": patch,
                "masks": len(masks),
                "mask_size": list(masks.size),
                "images": len(images),
                "clean_accuracy": float((pred == labels).float().mean()),
                "certified_accuracy": float(certified.float().mean()),
            }
        )
    return rows


def _no_grad(defense: InputDefense, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return defense(x)


def _calls_for(fn: Any, target_s: float) -> int:
    """Calls per timed repeat so that one repeat lasts about ``target_s`` (>= 1)."""
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    return max(1, round(target_s / max(time.perf_counter() - start, 1e-6)))


def _repeated(fn: Any, calls: int) -> Any:
    def run(_: int) -> None:
        for _ in range(calls):
            fn()

    return run


def report(row: dict[str, Any]) -> None:
    lat = {(c["defense"], c["what"], c["batch"]): c["best_s"] for c in row["latency"]}
    columns = [(what, batch) for what in ("transform", "defended") for batch in BATCHES]
    print_table(
        f"{row['model']}: per-image latency, microseconds (best of repeats)",
        ["defense", *(f"{what} b{batch}" for what, batch in columns)],
        [
            [name, *(1e6 * lat.get((name, *column), float("nan")) for column in columns)]
            for name in ["none", *INPUT_DEFENSES, "patchcleanser"]
        ],
    )
    cert = row["certification"]
    print_table(
        f"{row['model']}: PatchCleanser certification vs plain inference (goal >= {GOAL})",
        ["images", "evaluations", "certify img/s", "plain img/s", "ratio (median)", "goal met"],
        [
            [
                cert["images"],
                cert["evaluations"],
                cert["certify_images_per_s"],
                cert["plain_images_per_s"],
                cert["throughput_ratio_median"],
                "yes" if cert["meets_goal"] else "NO",
            ]
        ],
    )
    if "certified_accuracy" in row:
        print_table(
            f"{row['model']}: PatchCleanser accuracy, {MASKS_PER_AXIS} masks per axis",
            ["patch", "masks", "mask side", "images", "clean acc", "certified acc"],
            [
                [r["patch_size"], r["masks"], r["mask_size"][0], r["images"]]
                + [r["clean_accuracy"], r["certified_accuracy"]]
                for r in row["certified_accuracy"]
            ],
        )


def save(out: Path, env: dict, repeats: int, results: list, wall_s: float, merge: bool) -> None:
    """Written after every model, so an interrupted run keeps what it measured."""
    write_results(
        out,
        {
            "benchmark": "defense_cost",
            "environment": env,
            "settings": {
                "repeats": repeats,
                "batches": list(BATCHES),
                "patch_size": PATCH,
                "masks_per_axis": MASKS_PER_AXIS,
                "timing": "warm-up, then variants interleaved; latency per image is the call "
                "time / (calls per repeat x batch); 'defended' includes the model; "
                "'none/defended' is the undefended model; patchcleanser predict: one call per "
                "repeat, at most 2 repeats; certification: at most 3 repeats",
                "ratio": "plain inference time / certify time for the same two-mask images "
                "(plain images built before timing)",
                "goal_ratio_min": GOAL,
            },
            "run_wall_s": wall_s,
            "results": results,
        },
        key=("model", "threads"),
        merge=merge,
    )


if __name__ == "__main__":
    main()
