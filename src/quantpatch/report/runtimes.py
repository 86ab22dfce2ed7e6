""" "Integer runtimes": does an attack that works on a model still work once the model ships?

Per deployed target (ONNX Runtime, OpenVINO, ...), its clean accuracy and agreement with its
matched simulation, and per attack the images crafted on the model it was built from, scored
on that model and on the runtime (same images, same trained replicates: a paired test),
beside transfer from fp32 and any query-only attack on the runtime itself. "Attacks reach the
deployed model" holds on a runtime unless its rate is below its own model's beyond the
intervals (paired bootstrap and Student-t over replicates both excluding zero)."""

from __future__ import annotations

import statistics

from quantpatch.metrics import paired_difference
from quantpatch.report.findings import attack_rows, short_rate
from quantpatch.report.page import Page
from quantpatch.report.tables import (
    BOOTSTRAP_SEED,
    ModelOrder,
    SeedRate,
    clean_by_model,
    group,
    paired_or_rates,
    pool,
)
from quantpatch.results import CellRecord, ModelRecord


def runtime_section(
    page: Page,
    cells: list[CellRecord],
    models: list[ModelRecord],
    order: ModelOrder,
    replicas: list[ModelRecord],
) -> None:
    """``models``: one record per model (laying out rows); ``replicas``: every trained
    replicate's, whose clean accuracy and agreement the table averages."""
    runtimes = sorted((m for m in models if m.deployment), key=lambda m: order(m.name))
    if not runtimes:
        return
    page.heading("Integer runtimes: do attacks reach the deployed model?")
    page.para(
        "Per deployed model: its clean accuracy, its top-1 agreement with its matched "
        "simulation, and per attack the ASR of the images crafted on the model it was built "
        "from, on that model and on the runtime (paired: same images and trained models). "
        "Clean accuracy and agreement are means over the trained replicates. "
        "'holds' means the runtime is not fooled less than its own model beyond the 95 % "
        "intervals."
    )
    names = {m.name for m in models}
    by_pair = group(cells, "attack", "patch_size", "source", "target")
    clean = clean_by_model(replicas)
    agreement = {m.name: _agreement([r for r in replicas if r.name == m.name]) for m in runtimes}
    rows, verdicts = [], []
    for runtime in runtimes:
        built_from = _built_from(runtime, names)
        first = True
        for label, size in attack_rows(c for c in cells if c.target == runtime.name):
            row, verdict = _row(runtime, built_from, label, size, by_pair)
            if row is not None:
                row[2:4] = [short_rate(clean[runtime.name]), agreement[runtime.name]]
            if row is None:
                continue
            if not first:  # the runtime's own columns once, on its first row
                row[1:4] = ["", "", ""]
            first = False
            rows.append(row)
            verdicts.append(verdict)
    header = ["runtime", "built from", "clean accuracy", "agrees with simulation (clean; patch)",
              "attack", "on its own model (white-box)", "same images on the runtime",
              "transfer from fp32", "query-only on the runtime", "attacks reach it"]  # fmt: skip
    page.table(header, rows)
    page.para(_summary(verdicts), cls="finding")
    _spread(page, runtimes, by_pair, names)


def _built_from(runtime: ModelRecord, names: set[str]) -> str | None:
    """The model a runtime was exported from: its reference's first word (the QAT model for a
    QDQ export, the fp32 model for the runtime's own PTQ), when that is a model of the study."""
    first = runtime.deployment.reference.split()[0] if runtime.deployment.reference else ""
    return first if first in names else None


def _row(
    runtime: ModelRecord, built_from: str | None, label: str, size: int | None, by_pair
) -> tuple[list[str] | None, str | None]:
    def rate(source: str | None, target: str) -> SeedRate | None:
        return pool(by_pair.get((label, size, source, target), [])) if source else None

    fp32 = f"{runtime.arch}/fp32"
    own, carried = rate(built_from, built_from or ""), rate(built_from, runtime.name)
    transfer, query = rate(fp32, runtime.name), rate(runtime.name, runtime.name)
    if all(r is None for r in (own, carried, transfer, query)):
        return None, None  # only the random baseline, or nothing crafted: no empty row
    verdict = _verdict(own, carried)
    name = label + (f" {size}px" if size else "")
    row = [runtime.name, built_from or "–", "", "", name, short_rate(own), short_rate(carried), short_rate(transfer), short_rate(query),
           verdict or "–"]  # fmt: skip
    return row, verdict


def _agreement(replicas: list[ModelRecord]) -> str:
    """Top-1 agreement with the matched simulation on clean (and patched) images, averaged
    over the trained replicates."""
    deps = [m.deployment for m in replicas if m.deployment]
    clean = statistics.fmean(d.clean.simulation.agreement.rate for d in deps)
    patched = [d.patched.simulation.agreement.rate for d in deps if d.patched]
    return f"{100 * clean:.0f} %" + (
        f"; {100 * statistics.fmean(patched):.0f} %" if patched else ""
    )


def _verdict(own: SeedRate | None, carried: SeedRate | None) -> str | None:
    if own is None or carried is None or not own.n or not carried.n:
        return None
    a, b = paired_or_rates(carried, own)
    diff = paired_difference(a, b, seed=BOOTSTRAP_SEED)
    below = diff.excludes_zero and diff.difference < 0
    if below and (diff.t_ci is None or diff.t_excludes_zero):
        low, high = diff.ci
        return f"no: {100 * diff.difference:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}]"
    return "holds"


def _summary(verdicts: list[str | None]) -> str:
    judged = [v for v in verdicts if v is not None]
    if not judged:
        return ("No attack was crafted on a model a runtime was built from, so whether attacks "
                "reach the deployed model is not measured here.")  # fmt: skip
    failed = sum(v != "holds" for v in judged)
    if not failed:
        return (f"Attacks reach the deployed model on every runtime: in all {len(judged)} "
                "(runtime, attack) pairs the runtime is fooled as often as its own model, "
                "within the intervals.")  # fmt: skip
    return (f"In {failed} of {len(judged)} (runtime, attack) pairs the runtime is fooled less "
            "than its own model beyond the intervals (rows marked 'no').")  # fmt: skip


def _spread(page: Page, runtimes: list[ModelRecord], by_pair, names: set[str]) -> None:
    """Across runtimes built from the same fp32 model: the range of fp32-transfer rates."""
    sentences = []
    for arch in sorted({m.arch for m in runtimes}):
        fp32 = f"{arch}/fp32"
        mine = [m for m in runtimes if m.arch == arch and _built_from(m, names) == fp32]
        if len(mine) < 2:
            continue
        for label, size in sorted({k[:2] for k in by_pair if k[2] == fp32},
                                  key=lambda k: (k[0], k[1] or 0)):  # fmt: skip
            rates = {m.name: pool(by_pair.get((label, size, fp32, m.name), [])) for m in mine}
            rates = {k: v for k, v in rates.items() if v is not None}
            if len(rates) < 2:
                continue
            low = min(rates, key=lambda k: rates[k].rate)
            high = max(rates, key=lambda k: rates[k].rate)
            where = f"{label}{f' {size}px' if size else ''} from {fp32}"
            if rates[low].rate == rates[high].rate:
                sentences.append(f"{where}: {short_rate(rates[low])} on all {len(rates)} runtimes")
                continue
            sentences.append(f"{where}: {short_rate(rates[low])} ({low}) to "
                             f"{short_rate(rates[high])} ({high})")  # fmt: skip
    if sentences:
        page.para("Spread across runtimes of the same fp32 model: " + "; ".join(sentences) + ".",
                  cls="finding")  # fmt: skip
