"""Certificates in the report: certified accuracy per precision and runtime, in front of plain
and of certifiably trained models, how much of fp32's certificate each bit-width keeps, and the
certified-accuracy curve over patch sides. Built from model records only."""

from __future__ import annotations

from collections import defaultdict

from quantpatch.metrics import Rate, rate_ratio
from quantpatch.report.defenses import robust_accuracy
from quantpatch.report.figures import line_figure
from quantpatch.report.page import Page
from quantpatch.report.tables import BOOTSTRAP_SEED, ModelOrder, SeedRate, group, pool
from quantpatch.results import CellRecord, ModelRecord, RateRecord


def certified_section(
    page: Page, models: list[ModelRecord], cells: list[CellRecord], order: ModelOrder
) -> None:
    """The table of certificates, each beside the strongest adaptive attack's robust accuracy,
    and, where a defence certified several sides, its curves."""
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
        + " Attacked: the robust accuracy (share of all images still right) under the "
        "strongest adaptive attack on that target, at the largest attacked side the "
        "certificate covers, with the attack and the certificate at that side. "
        "The certificate is a lower bound on the true robust accuracy and an attack an upper "
        "bound: the truth lies between, and a wide gap means the attacks are weak, the "
        "certificate loose, or both."
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
            _attacked(records, cells),
        ])  # fmt: skip
    page.table(["model", "defence", "base model", "patch", "certificate", "undefended clean",
                "clean", "certified", "of fp32", "attacked"], rows)  # fmt: skip
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


def _attacked(records: list[ModelRecord], cells: list[CellRecord]) -> str:
    """The lowest robust accuracy any adaptive attack left on this target, pooled over seeds
    and replicates, at the largest attacked side the certificate covers, with the attack and
    the certificate at that side; flagged if it undercuts the certificate (a bug: a
    certified image cannot be flipped)."""
    name, cert = records[0].name, records[0].certified
    sides = {p.patch_size: i for i, p in enumerate(cert.curve)}
    sides.setdefault(cert.patch_size, None)
    for size in sorted(sides, reverse=True):
        mine = [c for c in cells if c.target == name and c.adaptive and c.patch_size == size]
        measured = [(robust_accuracy(pool(rows)), attack)
                    for (attack,), rows in group(mine, "attack").items()]  # fmt: skip
        measured = [(rate, attack) for rate, attack in measured if rate is not None]
        if not measured:
            continue
        rate, attack = min(measured, key=lambda item: item[0].rate)
        index = sides[size]
        certified = _rate([m.certified.certified if index is None else
                           m.certified.curve[index].certified for m in records])  # fmt: skip
        text = f"{rate.fmt()} ({attack}, {size} px; certified {certified.rate:.1%})"
        if rate.rate < certified.rate:
            text += ' <span class="flag">below the certificate: a bug</span>'
        return text
    return "not attacked"


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
