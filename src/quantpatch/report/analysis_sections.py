"""Report sections for the four "why" lenses, rendered from the typed analyses records."""

from __future__ import annotations

import numpy as np

from quantpatch.report import figures
from quantpatch.report.page import Page
from quantpatch.report.tables import ModelOrder, fmt_rate
from quantpatch.results import (
    AlignmentPair,
    Analyses,
    ArchFeatures,
    ArchStrength,
    GradientAlignment,
    MeanCI,
    SizeCurve,
    SpatialSensitivity,
)


def analysis_sections(page: Page, analyses: Analyses, order: ModelOrder) -> None:
    if analyses.sensitivity:
        _sensitivity(page, analyses.sensitivity, order)
    if analyses.size_curve:
        _size_curve(page, analyses.size_curve)
    if analyses.gradient_alignment:
        _gradient_alignment(page, analyses.gradient_alignment, order)
    if analyses.features:
        _features(page, analyses.features, order)
    if analyses.quant_strength:
        _quant_strength(page, analyses.quant_strength)


def _ci(stats: MeanCI, digits: int = 3) -> str:
    return f"{stats.mean:.{digits}f} [{stats.ci_low:.{digits}f}, {stats.ci_high:.{digits}f}]"


def _sensitivity(page: Page, data: SpatialSensitivity, order: ModelOrder) -> None:
    page.heading("Spatial sensitivity")
    maps = {name: 100 * np.array(m.rates, dtype=float) for name, m in data.maps.items()}
    page.figure(
        figures.heatmap_grid(
            maps, f"ASR (%) by patch position (top-left, stride {data.stride} px)", order
        ),
        "spatial_sensitivity",
        f"Each architecture's fp32 universal {data.patch_size} px patch pasted at every grid "
        "position, evaluated on every precision of that architecture.",
    )
    rows = []
    for name in sorted(data.maps, key=order):
        values = maps[name]
        best = np.unravel_index(np.nanargmax(values), values.shape)
        rows.append([name, data.maps[name].source, f"{np.nanmean(values):.1f}%",
                     f"{np.nanmin(values):.1f}%", f"{np.nanmax(values):.1f}%",
                     f"({best[0] * data.stride}, {best[1] * data.stride})",
                     str(data.maps[name].n)])  # fmt: skip
    page.table(["target", "patch from", "mean ASR", "min", "max", "best (y, x)", "n"], rows)


def _size_curve(page: Page, data: SizeCurve) -> None:
    page.heading("Patch size")
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    for row in data.rows:
        series.setdefault(f"{row.arch}: {row.kind}", []).append(
            (100 * row.fraction, 100 * row.rate, 100 * row.ci_low, 100 * row.ci_high)
        )
    page.figure(figures.line_figure(series, "patch area (% of image)", "ASR (%)", "ASR vs patch area"),
                "size_curve", "Universal patches trained per size; bands are 95 % Wilson intervals.")  # fmt: skip
    page.table(["arch", "setting", "area", "side (px)", "ASR"],
               [[r.arch, r.kind, f"{100 * r.fraction:.0f}%", str(r.patch_size), fmt_rate(r)]
                for r in data.rows])  # fmt: skip


def _gradient_alignment(page: Page, data: GradientAlignment, order: ModelOrder) -> None:
    page.heading("Gradient alignment")
    page.para(
        f"Input gradients of two models on the same {data.n_images} images, clean and with the "
        "fp32 universal patch pasted at the centre. Cosine = pointwise agreement; Edge IoU (top "
        "15 % Sobel edges of |grad|) and HOG cosine = structural agreement. Published "
        "(TriQDef, CIFAR-10 ResNet-56): cosine ≈ 0.05 fp↔quantized, 0.10–0.25 between quantized; "
        "Edge IoU ≈ 0.14–0.20; HOG cosine ≈ 0.80–0.82. Mean [95 % t-interval]."
    )
    clean = [p for p in data.pairs if p.input == "clean"]
    names = sorted({p.a for p in clean} | {p.b for p in clean}, key=order)
    for metric, title in (("cosine", "input-gradient cosine"), ("hog_cosine", "HOG cosine"),
                          ("edge_iou", "Edge IoU")):  # fmt: skip
        matrix = np.eye(len(names))
        for p in clean:
            i, j = names.index(p.a), names.index(p.b)
            matrix[i, j] = matrix[j, i] = getattr(p, metric).mean
        page.figure(figures.matrix_figure(names, matrix, f"{title} (clean inputs)"),
                    f"gradient_{metric}", f"Mean {title} between every pair of models.")  # fmt: skip
    page.para("References on the same images: 'chance' pairs image i of model a with image i-1 "
              "of model b (any class), 'same class' with another image of the same class; the "
              "last rows compare each fp32 model with an independently trained fp32 model "
              "(another seed). Agreement means something only above these.")  # fmt: skip
    rows = [_alignment_row(p) for p in [*data.pairs, *data.controls]]
    page.table(["model a", "model b", "input", "grad cosine", "chance", "same class",
                "Edge IoU", "chance", "same class", "HOG cosine", "chance", "same class", "n"],
               rows)  # fmt: skip


def _alignment_row(p: AlignmentPair) -> list[str]:
    row = [p.a, p.b, p.input]
    for metric in ("cosine", "edge_iou", "hog_cosine"):
        row += [_ci(getattr(p, metric)), _ci(getattr(p, f"{metric}_chance"), 2),
                _ci(getattr(p, f"{metric}_same_class"), 2)]  # fmt: skip
    return [*row, str(p.cosine.n)]


def _features(page: Page, data: dict[str, ArchFeatures], order: ModelOrder) -> None:
    page.heading("Feature representations")
    page.para("CKA per layer between the fp32 model and each precision (clean and patched "
              "inputs; 'debiased' = unbiased HSIC estimate, as plain CKA is biased towards 1 "
              "when there are few images next to the layer width), with an independently "
              "trained fp32 model as the reference level; patch dominance = share of activation change inside the patch's region "
              "divided by the region's share of the map (1 = not localised); Grad-CAM mass on the "
              "patch for the clean-prediction class and for the patched-prediction class.")  # fmt: skip
    for arch, block in data.items():
        precisions = sorted(block.precisions, key=lambda p: order(f"{arch}/{p}"))
        lenses = block.precisions
        series = {}
        for precision in precisions:
            for kind in ("clean", "patched"):
                values = getattr(lenses[precision], f"cka_{kind}")
                series[f"{precision} {kind}"] = [(i, v, v, v) for i, (_, v) in enumerate(values)]
        series["independent fp32 (reference)"] = [
            (i, v, v, v) for i, (_, v) in enumerate(block.cka_independent)
        ]
        first = lenses[precisions[0]].cka_clean
        page.figure(figures.line_figure(series, "layer", f"{block.cka} CKA vs fp32", f"{arch}: CKA per layer",
                                        [str(i) for i in range(len(first))]),
                    f"cka_{arch}", "Layer index follows the order of Conv2d/Linear layers.")  # fmt: skip
        dominance = {p: [(i, v, v, v) for i, (_, v) in enumerate(lenses[p].dominance)]
                     for p in precisions}  # fmt: skip
        page.figure(figures.line_figure(dominance, "layer", "patch dominance", f"{arch}: patch dominance"),
                    f"dominance_{arch}", "Values above 1: the patch's effect stays localised.")  # fmt: skip
        rows = [[f"{arch}/{p}", _ci(lenses[p].gradcam_mass_clean_class),
                 _ci(lenses[p].gradcam_mass_patched_class),
                 f"{lenses[p].patch_area_share:.3f}", str(block.n_images)]
                for p in precisions]  # fmt: skip
        page.table(["model", "Grad-CAM mass on patch (clean class)",
                    "Grad-CAM mass on patch (patched class)", "patch area share", "n"], rows)  # fmt: skip


def _quant_strength(page: Page, data: dict[str, ArchStrength]) -> None:
    page.heading("Quantization strength")
    page.para("Weight bits with float activations, activation bits with float weights, and both "
              "(QAT, first/last layer policy as in the study). White-box: a universal patch "
              "trained on that model; transfer: the fp32 model's patch.")  # fmt: skip
    for arch, block in data.items():
        series: dict[str, list[tuple[float, float, float, float]]] = {}
        for row in block.rows:
            for kind in ("white_box", "fp32_transfer"):
                rate = getattr(row, kind)
                series.setdefault(f"{row.axis} {kind.replace('_', ' ')}", []).append(
                    (row.bits, 100 * rate.rate, 100 * rate.ci_low, 100 * rate.ci_high)
                )
        page.figure(figures.line_figure(series, "bits", "ASR (%)", f"{arch}: ASR vs bits"),
                    f"quant_strength_{arch}", "Bands: 95 % Wilson intervals.")  # fmt: skip
        rows = []
        for row in block.rows:
            worst = max(row.layer_error, key=lambda item: item[1]) if row.layer_error else ("-", 0)
            rows.append([row.precision, row.axis, str(row.bits),
                         f"{100 * row.clean_accuracy:.1f}%", fmt_rate(row.white_box),
                         fmt_rate(row.fp32_transfer), f"{worst[0]}: {worst[1]:.3f}"])  # fmt: skip
        page.table(["precision", "axis", "bits", "clean acc", "white-box ASR", "fp32 transfer ASR",
                    "largest layer error (rel. L2)"], rows)  # fmt: skip
