"""Does the disalignment penalty turn fp32's and w2a2's input gradients apart on resnet20?

Not a speed benchmark. From the benchmark resnet20 (fp32, 32 px mnist5k), three switchable
fp32 + w2a2 models are trained on the same schedule from the same calibration: joint training
without a penalty (``random-precision``), the former one-sided ``disalign`` (the quantized
gradient a constant: ``OneSided`` below, the recipe up to commit 95694c8) and today's
two-sided ``disalign`` (both gradients differentiated). Reported per model, on held-out
images: the mean |cosine| and mean cosine of fp32's and w2a2's input gradients (eval mode,
cross-entropy of the true class), the clean accuracy of each precision, and the seconds per
training step. A fourth model adds TriQDef's feature and structure terms (``--feature-weight``
and ``--structure-weight``, 0.1 each), and every model also reports the structural agreement of the two
gradient maps (Edge IoU and HOG cosine of |grad|, with their chance level: image i against
image i-1) and the centred cosine of the penultimate features.

Run: ``python benchmarks/disalign_alignment.py`` (``--quick``: 256 images, 1 epoch).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    CACHE,
    RESULTS,
    base_parser,
    bench_model,
    environment,
    load1,
    measured,
    print_table,
    setup_threads,
    write_results,
)

from quantpatch.analysis import alignment_metrics
from quantpatch.data import Split
from quantpatch.defenses.training import FP32, Disalignment, create_recipe, train_recipe
from quantpatch.models import TrainConfig, predict_logits
from quantpatch.quant import QuantSpec

W2A2 = QuantSpec.parse("w2a2")


class OneSided(Disalignment):
    """``disalign`` as it was up to commit 95694c8: the quantized precisions' input gradients
    enter the penalty as constants, on the training-mode forward of the joint loss."""

    def loss(self, model, images, labels):
        x = images.detach().requires_grad_(True)
        losses = {name: F.cross_entropy(model.member(name)(x), labels) for name in model.names}
        (reference,) = torch.autograd.grad(losses[FP32.name], x, create_graph=True)
        similarity = []
        for name in model.names:
            if name != FP32.name:
                (other,) = torch.autograd.grad(losses[name], x, retain_graph=True)
                cosine = F.cosine_similarity(reference.flatten(1), other.flatten(1), dim=1)
                similarity.append(cosine.pow(2))
        penalty = torch.stack(similarity).mean()
        return torch.stack(list(losses.values())).mean() + self.weight * penalty


def alignment(model, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    grads = []
    for name in (FP32.name, W2A2.name):
        x = images.clone().requires_grad_(True)
        F.cross_entropy(model.member(name).eval()(x), labels).backward()
        grads.append(x.grad)
    cosine = F.cosine_similarity(grads[0].flatten(1), grads[1].flatten(1), dim=1)
    structure = alignment_metrics(*grads, chance=True)
    feature = Disalignment(feature_weight=1.0).penalties(model, images, labels)["feature"]
    return {"mean_abs_cosine": float(cosine.abs().mean()), "mean_cosine": float(cosine.mean()),
            **{key: float(structure[key].mean()) for key in
               ("edge_iou", "edge_iou_chance", "hog_cosine", "hog_cosine_chance")},
            "feature_centred_cosine_sq": float(feature.detach())}  # fmt: skip


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--feature-weight", type=float, default=0.1)
    parser.add_argument("--structure-weight", type=float, default=0.1)
    args = parser.parse_args()
    cores = setup_threads(args.threads)
    device = torch.device(args.device)
    fp32, data, _ = bench_model("resnet20", device)
    n_train, epochs = (256, 1) if args.quick else (4000, 1)
    train = Split(data.train.images[:n_train], data.train.labels[:n_train])
    held_out = data.test.images[:512], data.test.labels[:512]
    schedule = TrainConfig(epochs=epochs, lr=0.05, batch_size=64, seed=0)
    recipes = {
        "joint (random-precision)": create_recipe("random-precision"),
        "disalign one-sided (former)": OneSided(weight=args.weight),
        "disalign two-sided": create_recipe("disalign", weight=args.weight),
        "disalign + TriQDef feature, structure": create_recipe(
            "disalign",
            weight=args.weight,
            feature_weight=args.feature_weight,
            structure_weight=args.structure_weight,
        ),
    }
    out = Path(args.out or (CACHE if args.quick else RESULTS) / "disalign_alignment.json")
    env = environment(device, cores=cores)
    rows: list[dict[str, Any]] = []
    for label, recipe in recipes.items():
        load, start = load1(), time.perf_counter()
        model = train_recipe(fp32, [W2A2], recipe, train, schedule, device=device, progress=False)
        wall = time.perf_counter() - start
        steps = epochs * -(-n_train // schedule.batch_size)
        accuracy = {name: float((predict_logits(model.member(name), held_out[0], device)
                                 .argmax(1).cpu() == held_out[1]).float().mean())
                    for name in model.names}  # fmt: skip
        rows.append({"case": label, "weight": args.weight, "params": recipe.params(), **alignment(model, *held_out),
                     "clean_accuracy": accuracy, "s_per_step": wall / steps,
                     "measured": measured(load, None, wall)})  # fmt: skip
        print(f"{label}: |cos| {rows[-1]['mean_abs_cosine']:.3f}", flush=True)
    write_results(out, {"benchmark": "disalign_alignment", "environment": env,
                        "train_images": n_train, "epochs": epochs, "results": rows},
                  ("case",), False)  # fmt: skip
    print_table(
        f"resnet20 fp32 vs w2a2 input gradients, 512 held-out images (weight {args.weight})",
        [
            "model",
            "mean |cos|",
            "edge IoU",
            "HOG cos",
            "feature cos^2",
            "clean fp32",
            "clean w2a2",
            "s/step",
        ],  # fmt: skip
        [
            [
                r["case"],
                r["mean_abs_cosine"],
                r["edge_iou"],
                r["hog_cosine"],
                r["feature_centred_cosine_sq"],
                r["clean_accuracy"]["fp32"],
                r["clean_accuracy"]["w2a2"],
                r["s_per_step"],
            ]
            for r in rows
        ],  # fmt: skip
    )


if __name__ == "__main__":
    main()
