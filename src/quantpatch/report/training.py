"""The "Training defences" section: each training recipe's models beside plain QAT at the same
precision. White-box ASR is the attack crafted on the model itself (adaptive: it knows the
trained weights; on a random-precision model, the exact expectation over its precisions, and
success where every one is fooled, scored on the model as served); transfer is from the plain
fp32 model (trained without any recipe: the public model an attacker has; every recipe starts
from it) and, where measured, from an fp32 model trained independently from another seed
('fp32-indep', sharing nothing with the recipes) and from the fp32 model of the same training.
Built from result records only; absent when the study has no recipes."""

from __future__ import annotations

from dataclasses import dataclass

from quantpatch.metrics import rate_ratio
from quantpatch.report.defenses import robust_accuracy
from quantpatch.report.page import Page
from quantpatch.report.tables import (
    BOOTSTRAP_SEED,
    ModelOrder,
    SeedRate,
    crafted_attacks,
    group,
    paired_or_rates,
    pool,
)
from quantpatch.results import INDEPENDENT_FP32, ModelRecord, ResultsFile


@dataclass(frozen=True)
class RecipeRow:
    """One recipe model and its plain-QAT counterpart under one attack and patch size."""

    model: ModelRecord
    plain: ModelRecord | None
    white_box: SeedRate | None
    plain_white_box: SeedRate | None
    transfer: SeedRate | None
    plain_transfer: SeedRate | None
    independent_transfer: SeedRate | None
    plain_independent_transfer: SeedRate | None
    own_transfer: SeedRate | None

    @property
    def ratio(self) -> float | None:
        """White-box ASR as a fraction of plain QAT's (the issue's target: at most 0.5)."""
        if self.white_box is None or self.plain_white_box is None:
            return None
        if not self.white_box.n or not self.plain_white_box.rate:
            return None
        return self.white_box.rate / self.plain_white_box.rate

    def ratio_text(self) -> str:
        """The ratio with its paired 95 % interval (same images, same trained replicates)."""
        if self.ratio is None or self.white_box is None or self.plain_white_box is None:
            return "n/a"
        a, b = paired_or_rates(self.white_box, self.plain_white_box)
        ratio = rate_ratio(a, b, seed=BOOTSTRAP_SEED)
        if ratio.ci is None:
            return f"{self.ratio:.2f}"
        low, high = ratio.ci
        return f"{self.ratio:.2f} [{low:.2f}, {high:.2f}]"


def plain_counterpart(model: ModelRecord, models: list[ModelRecord]) -> ModelRecord | None:
    """The plainly trained model with the same arithmetic (a random-precision model: its
    lowest precision's)."""
    for other in models:
        if (other.arch == model.arch and other.recipe is None and other.defense is None
                and other.runtime == "torch" and not other.control_of
                and (other.weight_bits, other.act_bits, other.weight_levels)
                == (model.weight_bits, model.act_bits, model.weight_levels)):  # fmt: skip
            return other
    return None


def recipe_rows(results: ResultsFile, attack: str, size: int | None) -> list[RecipeRow]:
    """A row per quantized (or random-precision) model of every recipe."""
    chosen = [c for c in results.cells if c.attack == attack and c.patch_size == size]
    by_pair = group(chosen, "source", "target")

    def rate(source: str | None, target: str | None) -> SeedRate | None:
        return pool(by_pair.get((source, target), [])) if source and target else None

    rows = []
    for model in results.models:
        if model.recipe is None or model.defense is not None or model.weight_bits is None:
            continue
        plain = plain_counterpart(model, results.models)
        plain_name = plain.name if plain else None
        fp32, independent = f"{model.arch}/fp32", f"{model.arch}/{INDEPENDENT_FP32}"
        rows.append(RecipeRow(
            model, plain, rate(model.name, model.name), rate(plain_name, plain_name),
            rate(fp32, model.name), rate(fp32, plain_name),
            rate(independent, model.name), rate(independent, plain_name),
            rate(f"{fp32}-{model.recipe}", model.name),
        ))  # fmt: skip
    return rows


def training_section(
    page: Page, results: ResultsFile, order: ModelOrder, clean: dict[str, SeedRate]
) -> None:
    """The whole section; nothing when no model comes from a training recipe. ``clean``:
    each model's clean accuracy over its trained replicates, by name."""
    if not any(m.recipe for m in results.models):
        return
    page.heading("Training defences")
    page.para(
        "Each recipe trains one model at fp32 and every quantized precision at once (shared "
        "weights, per-precision BatchNorm and quantizer ranges). White-box: the attack crafted "
        "on that model itself (on a random-precision model: on the mean loss of every "
        "precision, scored on the model as served, a precision drawn per image). Transfer: "
        "crafted on the plain fp32 model, trained without any recipe (every recipe starts from "
        "it), and, where measured, on an fp32 model trained from another seed (independent of "
        "every recipe) and on the fp32 model of the same training. 'x plain' is white-box ASR "
        "over plain QAT's at "
        "the same precision, with its paired 95 % interval (same images and trained "
        "replicates); the goal is at most 0.5 at a clean-accuracy cost of at most 2 points. "
        "Robust accuracy: the share of all evaluation images still classified correctly after "
        "the white-box attack."
    )
    for attack, size in crafted_attacks(results.cells):
        rows = recipe_rows(results, attack, size)
        if not rows:
            continue
        page.heading(f"{attack}" + (f", {size} px" if size else ""), 3)
        own = any(_measured(row.own_transfer) for row in rows)
        independent = any(_measured(row.independent_transfer) for row in rows)
        body = []
        for row in sorted(rows, key=lambda r: (order(r.plain.name if r.plain else r.model.name),
                                               r.model.recipe)):  # fmt: skip
            body.append([
                row.model.name, _clean(row.model, row.plain, clean), _fmt(row.white_box),
                _fmt(row.plain_white_box), row.ratio_text(),
                _fmt(robust_accuracy(row.white_box)),
                _fmt(row.transfer), _fmt(row.plain_transfer),
                *([_fmt(row.independent_transfer), _fmt(row.plain_independent_transfer)]
                  if independent else []),
                *([_fmt(row.own_transfer)] if own else []),
            ])  # fmt: skip
        page.table(["model", "clean (vs plain QAT)", "white-box ASR", "plain QAT white-box",
                    "x plain", "robust accuracy", "transfer from plain fp32",
                    "plain QAT transfer",
                    *(["transfer from independent fp32", "plain QAT, independent"]
                      if independent else []),
                    *(["transfer from its fp32"] if own else [])],
                   body)  # fmt: skip


def _clean(model: ModelRecord, plain: ModelRecord | None, clean: dict[str, SeedRate]) -> str:
    mine = clean[model.name].rate
    text = f"{100 * mine:.1f}%"
    if plain is not None:
        text += f" ({100 * (mine - clean[plain.name].rate):+.1f} pt)"
    return text


def _measured(rate: SeedRate | None) -> bool:
    return rate is not None and bool(rate.n)


def _fmt(rate: SeedRate | None) -> str:
    return rate.fmt() if _measured(rate) else "n/a"
