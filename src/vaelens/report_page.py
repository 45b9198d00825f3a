"""The HTML of a report page: sections, figures embedded as base64 PNGs, inline CSS, tables.

Split from report.py, which decides what the page says; this is how it is written. No script and
no network reference: the page opens from disk.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import io
from .plots import figure_png

@dataclass
class Section:
    id: str
    title: str
    body: List[str] = field(default_factory=list)  # HTML fragments
    skipped: Optional[str] = None


class Page:
    """Collects sections and figures; renders them to one HTML string."""

    def __init__(self, fig_dir: Path, names: Sequence[str]):
        self.fig_dir = fig_dir
        self.names = tuple(names)  # every figure name the caller may remove as stale
        self.sections: List[Section] = []
        self.figures: Dict[str, Path] = {}

    def section(self, id: str, title: str) -> Section:
        s = Section(id, title)
        self.sections.append(s)
        return s

    def figure(self, s: Section, name: str, fig, caption: str = "") -> None:
        if name not in self.names:  # a bug here: stale-file removal must know every name
            raise ValueError(f"report figure {name!r} is not listed in FIGURE_NAMES")
        path = self.fig_dir / f"{name}.png"
        data = figure_png(fig)
        io.atomic_write(path, data)
        self.figures[name] = path
        b64 = base64.b64encode(data).decode("ascii")
        s.body.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
                      + (f"<figcaption>{html.escape(caption)}</figcaption>" if caption else "") + "</figure>")

    def render(self, title: str, header: List[str]) -> str:
        nav = " · ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in self.sections)
        parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                 f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                 f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
                 f"<h1>{html.escape(title)}</h1>", *header, f"<nav>{nav}</nav>"]
        for s in self.sections:
            parts.append(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>')
            if s.skipped:
                parts.append(f'<p class="skipped">section skipped: {html.escape(s.skipped)}</p>')
            parts.extend(s.body)
            parts.append("</section>")
        parts.append("<footer>written by vaelens; this file is self-contained (no network).</footer></body></html>\n")
        return "\n".join(parts)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1180px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.05em;margin-bottom:.3em}
nav{margin:1em 0;font-size:.95em}nav a{color:#2060a0;text-decoration:none}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}th{background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:.8em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.note{background:#fff8e0;border-left:3px solid #e0b000;padding:.3em .7em;font-size:.9em}
.skipped{color:#a03030;font-style:italic}.muted{color:#666;font-size:.9em}
.flex{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start}
footer{margin-top:3em;font-size:.8em;color:#888}
"""


def table(rows: Sequence[Sequence], header: Optional[Sequence[str]] = None) -> str:
    def cell(v, tag="td", first=False):
        number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        if isinstance(v, (float, np.floating)):
            v = f"{v:.4g}"
        cls = ' class="n"' if number and not first else ""
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"

    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(cell(h, "th", i == 0) for i, h in enumerate(header)) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(cell(v, first=i == 0) for i, v in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def flatten(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from flatten(v, key + ".")
        elif isinstance(v, (list, tuple)):
            if len(v) <= 12 and all(not isinstance(e, (dict, list)) for e in v):
                yield key, ", ".join(f"{e:.3g}" if isinstance(e, float) else str(e) for e in v)
            else:
                yield key, f"[{len(v)} values]"
        else:
            yield key, v
