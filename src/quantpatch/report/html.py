"""Self-contained HTML report (inline CSS, figures as base64 PNG) built from results only."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from pydantic import ValidationError

from quantpatch._io import read_json, write_text_atomic
from quantpatch.errors import CorruptFileError
from quantpatch.report import figures
from quantpatch.report.analysis_sections import analysis_sections
from quantpatch.report.tables import (
    attack_sizes,
    masking_flags,
    model_order,
    transfer_matrix,
)
from quantpatch.study.schema import ResultsFile

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.diag{background:#e8f6ff;font-weight:600}
.flag{color:#b00;font-weight:600}.note{color:#555;font-size:.9em}
img{max-width:100%}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
.patches{display:flex;flex-wrap:wrap;gap:1em}.patches figure{width:130px;margin:0}
"""


class Page:
    """Accumulates HTML fragments and writes figures next to the report for paper use."""

    def __init__(self, figure_dir: Path) -> None:
        self.parts: list[str] = []
        self.figure_dir = figure_dir

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)

    def heading(self, text: str, level: int = 2) -> None:
        self.add(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str, cls: str = "note") -> None:
        self.add(f'<p class="{cls}">{html.escape(text)}</p>')

    def figure(self, fig: Figure, name: str, caption: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        self.figure_dir.mkdir(parents=True, exist_ok=True)
        (self.figure_dir / f"{name}.png").write_bytes(buffer.getvalue())
        plt.close(fig)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        self.add(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def table(
        self, header: list[str], rows: list[list[str]], diag: set[tuple[int, int]] = frozenset()
    ) -> None:  # noqa: E501
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = []
        for i, row in enumerate(rows):
            cells = "".join(
                f'<td class="diag">{c}</td>' if (i, j) in diag else f"<td>{c}</td>"
                for j, c in enumerate(row)
            )
            body.append(f"<tr>{cells}</tr>")
        self.add(f"<table><tr>{head}</tr>{''.join(body)}</table>")

    def render(self, title: str) -> str:
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body>{''.join(self.parts)}</body></html>"
        )


def load_results(run_dir: Path) -> dict[str, Any]:
    data = read_json(Path(run_dir) / "results.json")
    try:
        ResultsFile.model_validate(data)
    except ValidationError as exc:
        raise CorruptFileError(f"{run_dir}/results.json does not match the results schema: "
                               f"{exc.errors()[0]['msg']}") from None  # fmt: skip
    return data


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render ``RUN_DIR/results.json`` (and patch PNGs) into one self-contained HTML file."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    page = Page(run_dir / "figures")
    _header(page, results)
    _models_section(page, results["models"])
    _patches_section(page, run_dir)
    _attack_sections(page, results["cells"])
    analysis_sections(page, results.get("analyses", {}))
    write_text_atomic(out, page.render(f"quantpatch: {results['study']}"))
    return out


def _pct(rate: dict[str, Any]) -> str:
    return (f"{100 * rate['rate']:.1f}% [{100 * rate['ci_low']:.1f}, {100 * rate['ci_high']:.1f}]"
            f" n={rate['n']}")  # fmt: skip


def _header(page: Page, results: dict[str, Any]) -> None:
    config, versions = results["config"], results["versions"]
    page.heading(f"quantpatch study '{results['study']}' on {results['dataset']}", 1)
    page.para(
        f"models {', '.join(config['models'])}; precisions {', '.join(config['precisions'])}"
        f"{' + ORT int8' if config.get('ort_int8') else ''}; attacks "
        f"{', '.join(a['name'] for a in config['attacks'])}; patch sizes "
        f"{config['patch_sizes']} px; seeds {config['seeds']}; {config['n_eval']} evaluation "
        f"images; device {results['device']}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    page.para(
        "Every rate is shown with its 95 % Wilson interval and n. Untargeted ASR counts only "
        "images the target model classifies correctly when clean; targeted ASR only images "
        "whose true class is not the target."
    )


def _models_section(page: Page, models: list[dict[str, Any]]) -> None:
    page.heading("Clean accuracy per precision")
    models = sorted(models, key=lambda m: model_order(m["name"]))
    page.figure(figures.clean_accuracy_figure(models), "clean_accuracy",
                "Clean accuracy on the evaluation images (bars: 95 % Wilson interval).")  # fmt: skip
    page.table(["model", "clean accuracy"], [[m["name"], _pct(m["clean"])] for m in models])
    deployed = [m for m in models if m.get("deployment")]
    if deployed:
        page.heading("Real int8 deployment (ONNX Runtime, static QDQ, per-channel)", 3)
        rows = []
        for m in deployed:
            dep = m["deployment"]
            agree = _pct(dep["agreement"]) if "agreement" in dep else "n/a"
            rows.append([m["name"], _pct(m["clean"]), f"{agree} vs {dep.get('agreement_with', '-')}",
                         f"{dep['int8_img_per_s']:.0f}", f"{dep['fp32_img_per_s']:.0f}",
                         f"{dep['speedup_vs_fp32']:.2f}x"])  # fmt: skip
        page.table(["model", "accuracy", "top-1 agreement", "int8 img/s", "fp32 img/s",
                    "speed-up"], rows)  # fmt: skip


def _patches_section(page: Page, run_dir: Path) -> None:
    pngs = sorted((run_dir / "patches").glob("*.png"))
    if not pngs:
        return
    page.heading("Patches")
    items = []
    for png in pngs:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        label = html.escape(png.stem.rsplit("__", 1)[0].replace("__", " · "))
        items.append(f'<figure><img src="data:image/png;base64,{data}" alt="{label}">'
                     f"<figcaption>{label}</figcaption></figure>")  # fmt: skip
    page.add(f'<div class="patches">{"".join(items)}</div>')


def _attack_sections(page: Page, records: list[dict[str, Any]]) -> None:
    page.heading("Transfer across precisions and architectures")
    for attack, size in attack_sizes(records):
        label = attack + (f", {size} px" if size else "")
        page.heading(label, 3)
        page.figure(figures.transfer_heatmap(records, attack, size),
                    f"transfer_{attack}_{size}",
                    "ASR (%) of adversarial images crafted on the row model, evaluated on the "
                    "column model; outlined: white-box.")  # fmt: skip
        crafted = any(r["source"] != "none" for r in records if r["attack"] == attack)
        if crafted:
            page.figure(figures.asr_vs_bits_figure(records, attack, size), f"asr_bits_{attack}_{size}",
                        "ASR vs precision: white-box, transfer from the fp32 sibling, and a "
                        "random patch of the same size; bars are 95 % Wilson intervals.")  # fmt: skip
        _transfer_table(page, records, attack, size)
    _patch_vs_pixel(page, records)
    _masking_section(page, records)


def _patch_vs_pixel(page: Page, records: list[dict[str, Any]]) -> None:
    """Patch and pixel transfer matrices side by side: the literature's patch-vs-pixel
    contrast. Panels: the universal patch and the per-image patch PGD (else the first patch
    attack crafted on single models), then the first pixel attack."""
    first: dict[str, tuple[str, tuple[str, int | None]]] = {}  # label -> (kind, panel)
    for r in records:
        if r["source"] != "none" and r["source_precision"] != "multibit":
            first.setdefault(r["attack"], (r["attack_kind"], (r["attack"], r["patch_size"])))
    patches = [panel for label, (kind, panel) in first.items() if kind == "patch"]
    preferred = [first[label][1] for label in ("universal", "patch-pgd") if label in first]
    pixels = [panel for kind, panel in first.values() if kind == "pixel"]
    if not patches or not pixels:
        return
    panels = [*(preferred or patches[:1]), pixels[0]]
    page.heading("Patch vs pixel attacks", 3)
    page.figure(
        figures.side_by_side(records, panels),
        "patch_vs_pixel",
        "Patch attacks (left) next to L∞ pixel PGD (right), each crafted on the row's model. "
        "Pixel perturbations are reported to transfer poorly across bit-widths, patches well; "
        "compare the off-diagonal cells of each architecture's block.",
    )


def _transfer_table(
    page: Page, records: list[dict[str, Any]], attack: str, size: int | None
) -> None:  # noqa: E501
    sources, targets, cells = transfer_matrix(records, attack, size)
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


def _masking_section(page: Page, records: list[dict[str, Any]]) -> None:
    flags = masking_flags(records)
    if not flags:
        return
    page.heading("Gradient-masking check", 3)
    page.para("For each quantized target: white-box ASR (straight-through gradients) vs transfer "
              "from its fp32 sibling. Transfer beating white-box by more than 5 points flags "
              "possible gradient masking.")  # fmt: skip
    rows = [[f["target"], f"{f['attack']} {f['patch_size'] or ''}", f"{100 * f['white_box']:.1f}%",
             f"{100 * f['fp32_transfer']:.1f}%",
             '<span class="flag">possible masking</span>' if f["flagged"] else "ok"]
            for f in flags]  # fmt: skip
    page.table(["target", "attack", "white-box", "fp32 transfer", "flag"], rows)
