"""``Page``: accumulates HTML fragments and writes each figure next to the report for papers."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from quantpatch._io import atomic_path  # noqa: E402

CSS = """
body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.diag{background:#e8f6ff;font-weight:600}
.flag{color:#b00;font-weight:600}.note{color:#555;font-size:.9em}.finding{margin:.3em 0}
img{max-width:100%}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
nav.toc{font-size:.9em;columns:2;background:#fafafa;border:1px solid #eee;padding:.5em 1.5em}
nav.toc a,h2 a.anchor,h3 a.anchor{text-decoration:none;color:inherit}
.patches{display:flex;flex-wrap:wrap;gap:1.2em}.patches figure{width:240px;margin:0}
.patches img{width:112px;height:112px;image-rendering:pixelated;border:1px solid #999;margin-right:4px}
"""


class Page:
    """An HTML page under construction; figures are embedded and also saved as PNG files."""

    def __init__(self, figure_dir: Path) -> None:
        self.parts: list[str] = []
        self.figure_dir = figure_dir
        self.sections: list[tuple[str, str]] = []  # (anchor, title) of each h2, in order
        self._anchors: set[str] = set()

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)

    def heading(self, text: str, level: int = 2) -> None:
        """A heading with a stable anchor (``#transfer-across-precisions``); h2s also make
        the table of contents."""
        if level == 1:
            self.add(f"<h1>{html.escape(text)}</h1>")
            return
        anchor = self._anchor(text)
        if level == 2:
            self.sections.append((anchor, text))
        self.add(f'<h{level} id="{anchor}"><a class="anchor" href="#{anchor}">'
                 f"{html.escape(text)}</a></h{level}>")  # fmt: skip

    def _anchor(self, text: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
        anchor, k = base, 2
        while anchor in self._anchors:
            anchor, k = f"{base}-{k}", k + 1
        self._anchors.add(anchor)
        return anchor

    def toc_here(self) -> None:
        """Mark where the table of contents goes (filled in by ``render``)."""
        self.add(TOC_MARK)

    def para(self, text: str, cls: str = "note") -> None:
        self.add(f'<p class="{cls}">{html.escape(text)}</p>')

    def figure(self, fig: Figure, name: str, caption: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(fig)
        with atomic_path(self.figure_dir / f"{name}.png") as tmp:
            tmp.write_bytes(buffer.getvalue())
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        self.add(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def table(
        self, header: list[str], rows: list[list[str]], diag: set[tuple[int, int]] = frozenset()
    ) -> None:
        """Cells are HTML (callers escape text); ``diag`` marks (row, column) cells."""
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
        links = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in self.sections)
        toc = f'<nav class="toc"><ul>{links}</ul></nav>' if self.sections else ""
        body = "".join(toc if part == TOC_MARK else part for part in self.parts)
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body>{body}</body></html>"
        )


TOC_MARK = "\x00toc\x00"
"""A placeholder part: the contents are known only when every section has been added."""
