""" "Key findings": the study's answers in a few sentences and one table, computed from the
results alone (ASR per bit-width with intervals, fp32 -> low-bit transfer for patch and pixel
attacks, the gradient-masking check). No number here comes from anywhere but results.json."""

from __future__ import annotations

from collections.abc import Iterable

from quantpatch.metrics import paired_difference, rate_ratio
from quantpatch.report.page import Page
from quantpatch.report.tables import (
    BOOTSTRAP_SEED,
    ModelOrder,
    SeedRate,
    group,
    masking_flags,
    paired_or_rates,
    pool,
)
from quantpatch.results import CellRecord, ModelRecord, ResultsFile, precision_order


def key_findings(page: Page, results: ResultsFile, order: ModelOrder) -> None:
    cells, models = results.cells, results.models
    if not cells:
        return
    page.heading("Key findings")
    page.para(replicates_sentence(cells), cls="finding")
    for arch in sorted({m.arch for m in models}):
        _arch_findings(page, arch, cells, models, order)
    _masking_sentence(page, cells, models, order)


def _arch_findings(
    page: Page, arch: str, cells: list[CellRecord], models: list[ModelRecord], order: ModelOrder
) -> None:
    torch_models = sorted(
        (m for m in models if m.arch == arch and m.runtime == "torch"), key=lambda m: order(m.name)
    )
    if not torch_models:
        return
    mine = [c for c in cells if c.target_arch == arch]
    attacks = attack_rows(mine)
    header = ["attack (white-box ASR)", *(m.precision for m in torch_models)]
    rows = []
    for label, size in attacks:
        chosen = [c for c in mine if c.attack == label and c.patch_size == size]
        own = [c for c in chosen if c.threat != "transfer"]  # white-box, ensemble, baseline
        by_target = group(own, "target")
        rates = [pool(by_target.get((m.name,), [])) for m in torch_models]
        if all(r is None for r in rates):
            continue  # crafted on other targets only (a query attack on ORT): no empty row
        rows.append([_attack_name(label, size, chosen), *(short_rate(r) for r in rates)])
    page.heading(arch, 3)
    if rows:
        page.table(header, rows)
    else:
        page.para(f"No attack was crafted on {arch}'s PyTorch models.", cls="finding")
    runtimes = sorted(
        (m.name for m in models if m.arch == arch and m.runtime != "torch"), key=order
    )
    for sentence in _transfer_sentences(arch, mine, torch_models, runtimes):
        page.para(sentence, cls="finding")


def replicates_sentence(cells: list[CellRecord]) -> str:
    """What the intervals cover: images only with one trained model, models too with more."""
    replicates = len({c.replicate for c in cells})
    if replicates == 1:
        return ("Model variance is unmeasured: each model was trained once (replicates: 1), so "
                "the intervals cover the evaluation images only; a model retrained from another "
                "seed may land outside them. Run with replicates: 3 or more before comparing "
                "models.")  # fmt: skip
    return (f"Every model was trained {replicates} times from independent seeds; intervals "
            "resample the trained models, then the images (hierarchical bootstrap), and a "
            "difference is stated only where its paired bootstrap interval and the Student-t "
            "interval over the trained models both exclude zero.")  # fmt: skip


def compare(transfer: SeedRate, white: SeedRate) -> str:
    """Transfer against white-box on the same images and models: the ratio with its interval
    and whether the two are distinguishable at this many replicates."""
    a, b = paired_or_rates(transfer, white)
    ratio = rate_ratio(a, b, seed=BOOTSTRAP_SEED)
    text = ""
    if ratio.ratio is not None and ratio.ci is not None:
        low, high = ratio.ci
        text = f", {ratio.ratio:.0%} of white-box [{low:.0%}, {high:.0%}]"
    diff = paired_difference(a, b, seed=BOOTSTRAP_SEED)
    low, high = diff.ci
    models = f"{white.replicates} trained model" + ("s" if white.replicates > 1 else "")
    # at a few replicates the bootstrap alone overclaims (27 % false differences in the test's
    # simulation of disagreeing models); the Student-t interval holds its level: both must agree
    if diff.excludes_zero and (diff.t_ci is None or diff.t_excludes_zero):
        return (
            text + f" (difference {100 * diff.difference:+.1f} points [{100 * low:+.1f}, "
            f"{100 * high:+.1f}] over {models})"
        )
    return text + f" (not distinguishable from white-box at {models})"


def attack_rows(cells: Iterable[CellRecord]) -> list[tuple[str, int | None]]:
    """Patch attacks first, then pixel attacks, then the source-free baseline."""
    seen = {(c.attack, c.patch_size): c for c in cells}
    rank = {"patch": 0, "pixel": 1}
    return sorted(
        seen,
        key=lambda k: (seen[k].threat == "source-free", rank[seen[k].attack_kind], k[0], k[1] or 0),
    )


def _attack_name(label: str, size: int | None, cells: list[CellRecord]) -> str:
    kind = "baseline" if cells[0].threat == "source-free" else cells[0].attack_kind
    return f"{label}" + (f" {size}px" if size else "") + f" ({kind})"


def short_rate(rate: SeedRate | None) -> str:
    if rate is None:
        return "–"
    low, high = rate.ci
    return f"{100 * rate.rate:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"


def _transfer_sentences(
    arch: str, cells: list[CellRecord], torch_models: list[ModelRecord], runtimes: list[str]
) -> list[str]:
    """fp32 -> the lowest precision and every deployed runtime: patch vs pixel attacks."""
    fp32 = f"{arch}/fp32"
    quantized = [m for m in torch_models if m.weight_bits or m.act_bits]
    if not quantized:
        return []
    lowest = min(quantized, key=lambda m: precision_order(m.weight_bits, m.act_bits))
    targets = [lowest.name, *runtimes]
    sentences = []
    for target in targets:
        parts = []
        for label, size in attack_rows(cells):
            chosen = [c for c in cells if c.attack == label and c.patch_size == size]
            if chosen[0].threat == "source-free" or chosen[0].source_precision == "multibit":
                continue
            if any(c.threat == "query-only" for c in chosen):
                continue  # query attacks have their own section
            by_pair = group(chosen, "source", "target")
            transfer = pool(by_pair.get((fp32, target), []))
            white = pool(by_pair.get((target, target), []))
            if transfer is None:
                continue
            kind = chosen[0].attack_kind
            text = f"{label} ({kind}) {short_rate(transfer)}"
            if white is not None and white.n and transfer.n:
                text += compare(transfer, white)
            parts.append(text)
        if parts:
            sentences.append(f"Transfer {fp32} → {target}: " + "; ".join(parts) + ".")
    return sentences


def _masking_sentence(
    page: Page, cells: list[CellRecord], models: list[ModelRecord], order: ModelOrder
) -> None:
    flags = masking_flags(cells, models, order)
    if not flags:
        return
    flagged = [f for f in flags if f["flagged"]]
    if not flagged:
        page.para(
            f"Gradient masking: on none of {len(flags)} (quantized target, attack) pairs does "
            "transfer from the fp32 sibling beat the white-box attack beyond the 95 % intervals.",
            cls="finding",
        )
        return
    names = ", ".join(f"{f['target']} ({f['attack']})" for f in flagged)
    page.para(
        f"Possible gradient masking on {len(flagged)} of {len(flags)} pairs: {names}; their "
        "white-box numbers understate the attack (see the masking check).",
        cls="finding flag",
    )
