"""Self-contained HTML report (inline CSS, figures as base64 PNG) built from results only."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from quantpatch._io import read_json, write_text_atomic
from quantpatch.errors import QuantpatchError
from quantpatch.report import figures
from quantpatch.report.analysis_sections import analysis_sections
from quantpatch.report.certified import certified_findings, certified_section
from quantpatch.report.defenses import defenses_section
from quantpatch.report.findings import key_findings
from quantpatch.report.fits import fit_section
from quantpatch.report.page import Page
from quantpatch.report.queries import query_section
from quantpatch.report.runtimes import runtime_section
from quantpatch.report.tables import (
    ModelOrder,
    attack_sizes,
    clean_by_model,
    fmt_rate,
    masking_flags,
    transfer_matrix,
)
from quantpatch.report.training import training_section
from quantpatch.results import (
    PATCH_EXAMPLES,
    CellRecord,
    ModelRecord,
    ResultsFile,
    load_results,
)


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render ``RUN_DIR/results.json`` (and patch PNGs) into one self-contained HTML file."""
    run_dir = Path(run_dir)
    loaded = load_results(run_dir / "results.json")
    everything = first_replicates(loaded)
    results = undefended(everything)
    out = Path(out) if out else run_dir / "report.html"
    order = ModelOrder(everything.models)
    clean = clean_by_model(loaded.models)
    page = Page(run_dir / "figures")
    _header(page, results)
    key_findings(page, results, order)
    certified_findings(page, loaded.models, order)
    _models_section(page, results.models, order, undefended(loaded).models)
    _patches_section(page, run_dir)
    _attack_sections(page, results, order)
    query_section(page, results.cells, results.models, order)
    runtime_section(page, results.cells, results.models, order, undefended(loaded).models)
    fit_section(page, results.cells, order)
    defenses_section(page, everything, order, clean)
    certified_section(page, loaded.models, loaded.cells, order)  # every replicate: it pools them
    training_section(page, results, order, clean)
    analysis_sections(page, results.analyses, order)
    write_text_atomic(out, page.render(f"quantpatch: {results.study}"))
    return out


def first_replicates(results: ResultsFile) -> ResultsFile:
    """One model record per model name (its first trained replicate): what the sections need
    to lay out models; the cells keep every replicate, and the rates pool them."""
    first: dict[str, ModelRecord] = {}
    for model in sorted(results.models, key=lambda m: m.replicate):
        first.setdefault(model.name, model)
    return results.model_copy(update={"models": list(first.values())})


def undefended(results: ResultsFile) -> ResultsFile:
    """The results without defended targets: every section but "Defences" reads these, so a
    study's transfer matrices and findings read the same with or without defences."""
    return results.model_copy(update={
        "models": [m for m in results.models if m.defense is None],
        "cells": [c for c in results.cells if c.defense is None],
    })  # fmt: skip


def _header(page: Page, results: ResultsFile) -> None:
    cells, models = results.cells, results.models
    archs = sorted({m.arch for m in models})
    precisions = sorted({m.precision for m in models})
    attacks = sorted({c.attack for c in cells})
    sizes = sorted({c.patch_size for c in cells if c.patch_size})
    seeds = sorted({c.seed for c in cells})
    n_eval = max((m.clean.n for m in models), default=0)
    versions = ", ".join(f"{k} {v}" for k, v in results.versions.items())
    page.heading(f"quantpatch study '{results.study}' on {results.dataset}", 1)
    page.para(
        f"models {', '.join(archs)}; precisions {', '.join(precisions)}; attacks "
        f"{', '.join(attacks)}; patch sizes {sizes} px; seeds {seeds}; {n_eval} evaluation "
        f"images; device {results.device}; {versions}"
    )
    replicates = len({c.replicate for c in cells}) or 1
    interval = ("its 95 % hierarchical-bootstrap interval over the "
                f"{replicates} trained replicates and the images" if replicates > 1
                else "its 95 % Wilson interval (the images only: one trained model)")  # fmt: skip
    page.para(
        f"Every rate is shown with {interval} and n, the images per seed. Untargeted ASR "
        "counts only images the target model classifies correctly when clean; targeted ASR "
        "only images whose true class is not the target."
    )
    page.add('<p class="note">Data: <a href="results.json">results.json</a> (every record), '
             '<a href="results.csv">results.csv</a> (one row per cell and target), '
             '<a href="figures/">figures/</a> (each figure as PNG).</p>')  # fmt: skip
    page.toc_here()


def _models_section(
    page: Page, models: list[ModelRecord], order: ModelOrder, replicas: list[ModelRecord]
) -> None:
    page.heading("Clean accuracy per precision")
    models = sorted(models, key=lambda m: order(m.name))
    clean = clean_by_model(replicas)
    several = max((c.replicates for c in clean.values()), default=1) > 1
    page.figure(figures.clean_accuracy_figure(models, order, clean), "clean_accuracy",
                "Clean accuracy of each model on the evaluation images"
                + (", mean over its trained replicates (bars: 95 % interval over models, "
                   "then images)." if several else " (bars: 95 % Wilson interval)."))  # fmt: skip
    if several:
        rows = [[m.name, clean[m.name].fmt(),
                 ", ".join(f"{100 * r.rate:.1f}%" for r in clean[m.name].per_replicate)]
                for m in models]  # fmt: skip
        page.table(["model", "clean accuracy (mean over replicates)", "each trained replicate"],
                   rows)  # fmt: skip
    else:
        page.table(["model", "clean accuracy"], [[m.name, fmt_rate(m.clean)] for m in models])
    _training_warnings(page, models)
    deployed = [m for m in models if m.deployment]
    if deployed:
        _deployment_table(page, deployed)


WELL_TRAINED = 0.80
"""Below this clean accuracy the best model of an architecture is flagged as undertrained."""
QUANTIZATION_LOSS = 0.10
"""A model this far below its architecture's best is flagged as badly trained or quantized."""


def _training_warnings(page: Page, models: list[ModelRecord]) -> None:
    """Flag models whose ASR would be read on a small, easy subset: an undertrained
    architecture, or a precision that lost much of its architecture's accuracy."""
    for arch in sorted({m.arch for m in models}):
        mine = [m for m in models if m.arch == arch]
        best = max(mine, key=lambda m: m.clean.rate)
        if best.clean.rate < WELL_TRAINED:
            page.para(f"Warning: {arch}'s best model ({best.name}) reaches only "
                      f"{100 * best.clean.rate:.1f} % clean accuracy; its ASR counts only the "
                      "images it gets right. Train longer before reading its rates.",
                      "flag")  # fmt: skip
        weak = [m.name for m in mine if m.clean.rate < best.clean.rate - QUANTIZATION_LOSS]
        if weak:
            page.para(f"Warning: {', '.join(weak)} lost more than "
                      f"{100 * QUANTIZATION_LOSS:.0f} points of clean accuracy against "
                      f"{best.name}: badly trained or badly quantized, so its ASR is measured "
                      "on fewer, easier images.", "flag")  # fmt: skip


def _deployment_table(page: Page, deployed: list[ModelRecord]) -> None:
    """Each ORT model against its simulation and against fp32, the null the simulation must
    beat: agreement (and relative logit error) on clean and on adversarial images."""
    page.heading("Real int8 deployment (ONNX Runtime)", 3)
    rows = []
    for m in deployed:
        dep = m.deployment
        checks = (("clean", dep.clean), ("adversarial", dep.adversarial), ("patch", dep.patched))
        for label, check in checks:
            if check is None:
                continue
            rows.append([
                m.name if label == "clean" else "", label, fmt_rate(check.int8_accuracy),
                f"{fmt_rate(check.simulation.agreement)} ({check.simulation.logit_error:.3f})",
                f"{fmt_rate(check.fp32.agreement)} ({check.fp32.logit_error:.3f})",
                "yes" if check.simulation_closer else "NO",
            ])  # fmt: skip
    page.table(["deployed model", "images", "int8 accuracy", "agreement with simulation (logit err)",
                "agreement with fp32, the null (logit err)", "simulation closer"], rows)  # fmt: skip
    page.para(" ".join(
        f"{m.name}: {m.deployment.kind} against {m.deployment.reference}"
        f"{_settings(m.deployment.settings)}; {m.deployment.int8_img_per_s:.0f} img/s vs fp32 "
        f"{m.deployment.fp32_img_per_s:.0f} ({m.deployment.speedup_vs_fp32:.2f}x)."
        for m in deployed
    ) + f" Adversarial images: {deployed[0].deployment.adversarial_attack}."
      + (f" Patch images: {deployed[0].deployment.patched_attack}."
         if deployed[0].deployment.patched_attack else ""))  # fmt: skip


def _settings(settings: dict) -> str:
    return " (" + ", ".join(f"{k} {v}" for k, v in settings.items()) + ")" if settings else ""


def _patches_section(page: Page, run_dir: Path) -> None:
    """Each patch of the first trained replicate (8x) beside the first evaluation image with
    that patch applied (4x) and what the source model then predicts."""
    notes = {png: _example_note(png) for png in sorted((run_dir / "patches").glob("*.png"))}
    shown = {png: note for png, note in notes.items() if _replicate_of(png, note) in (None, 0)}
    if not shown:
        return
    page.heading("Patches")
    page.para("Each patch (pixels upscaled 8x) beside the first evaluation image with the "
              "patch applied (4x) and the source model's prediction on it; first trained "
              "replicate only.", "note")  # fmt: skip
    figures_html = "".join(_patch_figure(png, note) for png, note in shown.items())
    page.add(f'<div class="patches">{figures_html}</div>')


def _replicate_of(png: Path, note: dict | None) -> int | None:
    """From the patch's note, else from its cell id (``...__r<k>__<key>``)."""
    if note and isinstance(note.get("replicate"), int):
        return note["replicate"]
    found = re.search(r"__r(\d+)__[0-9a-f]+$", png.stem)
    return int(found.group(1)) if found else None


def _example_note(png: Path) -> dict | None:
    path = png.parent / PATCH_EXAMPLES / f"{png.stem}.json"
    if not path.is_file():
        return None
    try:
        note = read_json(path)
    except QuantpatchError:
        return None
    return note if isinstance(note, dict) else None


def _patch_figure(png: Path, note: dict | None) -> str:
    label = html.escape(png.stem.rsplit("__", 1)[0].replace("__", " · "))
    images = [_inline_png(png, label)]
    example = png.parent / PATCH_EXAMPLES / png.name
    caption = label
    if note and example.is_file():
        images.append(_inline_png(example, f"{label}, applied"))
        said, truth, fooled = note.get("prediction"), note.get("label"), note.get("fooled")
        verdict = {True: "fooled", False: "not fooled"}.get(fooled, "not counted: wrong when clean")
        goal = f", target {note['target_class']}" if note.get("target_class") is not None else ""
        caption += "<br>" + html.escape(
            f"true {truth}{goal} → {note.get('predicted_by')} says {said} ({verdict})"
        )
    return f"<figure>{''.join(images)}<figcaption>{caption}</figcaption></figure>"


def _inline_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _attack_sections(page: Page, results: ResultsFile, order: ModelOrder) -> None:
    records = results.cells
    page.heading("Transfer across precisions and architectures")
    for attack, size in attack_sizes(records):
        label = attack + (f", {size} px" if size else "")
        page.heading(label, 3)
        page.figure(figures.transfer_heatmap(records, attack, size, order),
                    f"transfer_{attack}_{size}",
                    "ASR (%) of adversarial images crafted on the row model, evaluated on the "
                    "column model; outlined: white-box.")  # fmt: skip
        crafted = any(r.source != "none" for r in records if r.attack == attack)
        bits_figure = (figures.asr_vs_bits_figure(records, results.models, attack, size, order)
                       if crafted else None)  # fmt: skip
        if bits_figure is not None:
            page.figure(bits_figure, f"asr_bits_{attack}_{size}",
                        "ASR against weight bits: on the target itself (white-box, or "
                        "query-only for a query attack), transferred from the fp32 sibling, "
                        "and a random patch of the same size; bars are the 95 % intervals of "
                        "the tables. Lines join the trained precisions; open markers are "
                        "fp32-ft controls (at 32) and integer runtimes (at their bits).")  # fmt: skip
        _transfer_table(page, records, attack, size, order)
    _patch_vs_pixel(page, records, order)
    _masking_section(page, records, results.models, order)


def _patch_vs_pixel(page: Page, records: list[CellRecord], order: ModelOrder) -> None:
    """Patch and pixel transfer matrices side by side: the literature's patch-vs-pixel
    contrast. Panels: the universal patch and the per-image patch PGD (else the first patch
    attack crafted on single models), then the first pixel attack."""
    first: dict[str, tuple[str, tuple[str, int | None]]] = {}  # label -> (kind, panel)
    for r in records:
        if r.source != "none" and r.source_precision != "multibit":
            first.setdefault(r.attack, (r.attack_kind, (r.attack, r.patch_size)))
    patches = [panel for kind, panel in first.values() if kind == "patch"]
    preferred = [first[label][1] for label in ("universal", "patch-pgd") if label in first]
    pixels = [panel for kind, panel in first.values() if kind == "pixel"]
    if not patches or not pixels:
        return
    panels = [*(preferred or patches[:1]), pixels[0]]
    page.heading("Patch vs pixel attacks", 3)
    page.figure(
        figures.side_by_side(records, panels, order),
        "patch_vs_pixel",
        "Patch attacks (left) next to L∞ pixel PGD (right), each crafted on the row's model. "
        "Pixel perturbations are reported to transfer poorly across bit-widths, patches well; "
        "compare the off-diagonal cells of each architecture's block.",
    )


def _transfer_table(
    page: Page, records: list[CellRecord], attack: str, size: int | None, order: ModelOrder
) -> None:
    sources, targets, cells = transfer_matrix(records, attack, size, order)
    rows, diag = [], set()
    for i, source in enumerate(sources):
        row = [source]
        for j, target in enumerate(targets):
            cell = cells.get((source, target))
            row.append(cell.fmt() if cell else "")
            if source == target:
                diag.add((i, j + 1))
        rows.append(row)
    page.table(["source \\ target", *targets], rows, diag)


def _masking_section(
    page: Page, records: list[CellRecord], models: list[ModelRecord], order: ModelOrder
) -> None:
    flags = masking_flags(records, models, order)
    if not flags:
        return
    page.heading("Gradient-masking check", 3)
    page.para("For each quantized target: white-box ASR (straight-through gradients) vs transfer "
              "from its fp32 sibling. Transfer beating white-box beyond the 95 % intervals flags "
              "possible gradient masking.")  # fmt: skip
    rows = [[f["target"], f"{f['attack']} {f['patch_size'] or ''}", f["white_box"].fmt(),
             f["fp32_transfer"].fmt(),
             '<span class="flag">possible masking</span>' if f["flagged"] else "ok"]
            for f in flags]  # fmt: skip
    page.table(["target", "attack", "white-box", "fp32 transfer", "flag"], rows)
