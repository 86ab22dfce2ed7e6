"""Certificates in the report: certified accuracy per precision and runtime, in front of plain
and of certifiably trained models, how much of fp32's certificate each bit-width keeps, and the
certified-accuracy curve over patch sides. Built from model records only."""

from __future__ import annotations

from collections import defaultdict

from quantpatch.metrics import Rate, rate_ratio
from quantpatch.report.figures import line_figure
from quantpatch.report.page import Page
from quantpatch.report.tables import BOOTSTRAP_SEED, ModelOrder, SeedRate
from quantpatch.results import ModelRecord, RateRecord


def certified_section(page: Page, models: list[ModelRecord], order: ModelOrder) -> None:
    """The table of certificates and, where a defence certified several sides, its curves."""
    by_name = _by_name([m for m in models if m.certified is not None])
    if not by_name:
        return
    undefended = _by_name([m for m in models if m.defense is None])
    names = sorted(by_name, key=lambda n: (by_name[n][0].defense, order(_base(by_name[n][0]))))
    page.heading("Certified robust accuracy per precision", 3)
    replicates = max(len(records) for records in by_name.values())
    page.para(
        "Certified: no patch of the stated side anywhere, whatever its content, changes the "
        "prediction. Clean: the defended model's accuracy. Base model 'certifiable': trained "
        "(and quantized) on the defence's own ablated or masked inputs; 'plain': the study's "
        "model trained on whole images. 'Of fp32': certified accuracy as a share of the same "
        "defence's fp32 model of that architecture and training, with a 95 % "
        + ("paired bootstrap interval over the trained models."
           if replicates > 1 else "bootstrap interval over images (one trained model).")
    )  # fmt: skip
    rows = []
    for name in names:
        records = by_name[name]
        first, cert = records[0], records[0].certified
        plain = undefended.get(_base(first))
        rows.append([
            _base(first), first.defense, cert.base_training, f"{cert.patch_size} px", cert.method,
            _rate([m.clean for m in plain]).fmt() if plain else "n/a",
            _rate([m.certified.clean for m in records]).fmt(),
            _rate([m.certified.certified for m in records]).fmt(),
            _kept_of_fp32(records, by_name),
        ])  # fmt: skip
    page.table(["model", "defence", "base model", "patch", "certificate", "undefended clean",
                "clean", "certified", "of fp32"], rows)  # fmt: skip
    _curves(page, by_name, names)


def certified_findings(page: Page, models: list[ModelRecord], order: ModelOrder) -> None:
    """Key findings: per certified defence and architecture, what fp32 certifies, what the
    lowest precision and each runtime keep of it."""
    by_name = _by_name([m for m in models if m.certified is not None])
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, records in by_name.items():
        groups[(records[0].defense, records[0].arch)].append(name)
    for (defense, arch), names in sorted(groups.items()):
        names.sort(key=lambda n: order(_base(by_name[n][0])))
        fp32 = [n for n in names if _is_float_torch(by_name[n][0])]
        if not fp32:
            continue
        first = by_name[fp32[0]][0]
        cert = first.certified
        parts = [f"Certified ({defense}, {cert.base_training} {arch}): fp32 "
                 f"{_rate([m.certified.certified for m in by_name[fp32[0]]]).fmt()} against a "
                 f"{cert.patch_size} px patch at {_rate([m.certified.clean for m in by_name[fp32[0]]]).fmt()} clean"]  # fmt: skip
        for name in names[1:]:
            records = by_name[name]
            share = _kept_of_fp32(records, by_name)
            parts.append(f"{records[0].precision} "
                         f"{_rate([m.certified.certified for m in records]).fmt()} ({share} of fp32)")  # fmt: skip
        page.para("; ".join(parts) + ".", cls="finding")


def _is_float_torch(model: ModelRecord) -> bool:
    return model.runtime == "torch" and model.weight_bits is None


def _by_name(models: list[ModelRecord]) -> dict[str, list[ModelRecord]]:
    grouped: dict[str, list[ModelRecord]] = defaultdict(list)
    for model in sorted(models, key=lambda m: m.replicate):
        grouped[model.name].append(model)
    return dict(grouped)


def _base(model: ModelRecord) -> str:
    return f"{model.arch}/{model.precision}"


def _rate(records: list[RateRecord]) -> SeedRate:
    """One rate over the trained replicates (a hierarchical interval with several)."""
    per_replicate = tuple(Rate(r.successes, r.n) for r in records)
    mean = sum(r.rate for r in per_replicate) / len(per_replicate)
    return SeedRate(rate=mean, n=max(r.n for r in per_replicate), spread=0.0,
                    per_seed=per_replicate[:1], per_replicate=per_replicate)  # fmt: skip


def _kept_of_fp32(records: list[ModelRecord], by_name: dict[str, list[ModelRecord]]) -> str:
    """Certified accuracy over the fp32 model's behind the same defence and training."""
    first = records[0]
    fp32 = next((group for group in by_name.values()
                 if group[0].defense == first.defense and group[0].arch == first.arch
                 and _is_float_torch(group[0])), None)  # fmt: skip
    if fp32 is None or fp32[0].name == first.name or len(fp32) != len(records):
        return "–"
    ratio = rate_ratio(
        [Rate(m.certified.certified.successes, m.certified.certified.n) for m in records],
        [Rate(m.certified.certified.successes, m.certified.certified.n) for m in fp32],
        seed=BOOTSTRAP_SEED,
    )
    if ratio.ratio is None or ratio.ci is None:
        return "undefined (fp32 certifies none)"
    low, high = ratio.ci
    upper = "∞" if high == float("inf") else f"{high:.0%}"
    return f"{ratio.ratio:.0%} [{low:.0%}, {upper}]"


def _curves(page: Page, by_name: dict[str, list[ModelRecord]], names: list[str]) -> None:
    """Per defence with a curve: certified accuracy against patch side, one line per model."""
    defenses = [d for d in dict.fromkeys(by_name[n][0].defense for n in names)
                if any(by_name[n][0].certified.curve for n in names
                       if by_name[n][0].defense == d)]  # fmt: skip
    for defense in defenses:
        series = {}
        for name in names:
            records = by_name[name]
            if records[0].defense != defense or not records[0].certified.curve:
                continue
            points = []
            for i, point in enumerate(records[0].certified.curve):
                rate = _rate([m.certified.curve[i].certified for m in records])
                low, high = rate.ci
                points.append((point.patch_size, 100 * rate.rate, 100 * low, 100 * high))
            series[_base(records[0])] = points
        page.figure(
            line_figure(series, "patch side (px)", "certified accuracy (%)", defense),
            f"certified_curve_{defense}",
            f"Certified accuracy against the side of the patch, behind {defense}, per model "
            "(bands: 95 % intervals); each side certified from the same votes.",
        )
