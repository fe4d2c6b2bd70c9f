"""Evaluation reports people read: one self-contained HTML page (and a Markdown summary) per run.

Images and plots are embedded as data URIs, so the page opens anywhere: from the DVC workspace, as an
MLflow artifact, or as a Kubeflow HTML artifact in the pipeline UI. Plots are drawn with matplotlib;
tables (the confusion matrix among them) are HTML, so Chinese labels render with the browser's fonts.
"""

from __future__ import annotations

import base64
import functools
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from PIL import Image

from zhclip.components.core.fonts import CJK_FONTS, CSS_FONT_STACK

THUMBNAIL = 96


@dataclass
class Table:
    title: str
    rows: list[list[Any]]  # the first row is the header
    shading: list[list[float]] = field(default_factory=list)  # optional 0..1 per body cell (confusion matrix)


@dataclass
class Figure:
    title: str
    uri: str  # data:image/png;base64,...


@dataclass
class Result:
    label: str
    hit: bool
    image: Image.Image | None = None


@dataclass
class Example:
    query: str
    results: list[Result]


@dataclass
class Report:
    title: str
    notes: dict[str, Any]
    tables: list[Table]
    figures: list[Figure] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    examples_title: str = "Example retrievals: query texts with their top images (hits marked ✓)"


_HTML = jinja2.Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="zh"><head><meta charset="utf-8"><title>{{ r.title }}</title>
<style>
body { font-family: {{ fonts | safe }}; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.example { margin-bottom: 1em; }
.result { display: inline-block; margin-right: 0.5em; text-align: center; font-size: 0.8em; }
.result img { border: 4px solid #ccc; display: block; width: 96px; image-rendering: pixelated; }
.hit img { border-color: #2a2; }
.hit .mark { color: #2a2; font-weight: bold; }
</style></head>
<body>
<h1>{{ r.title }}</h1>
<table class="notes">{% for key, value in r.notes.items() %}
<tr><th>{{ key }}</th><td>{{ value }}</td></tr>{% endfor %}</table>
{% for t in r.tables %}<h2>{{ t.title }}</h2>
<table class="metrics"><tr>{% for cell in t.rows[0] %}<th>{{ cell }}</th>{% endfor %}</tr>
{% for row in t.rows[1:] %}{% set outer = loop.index0 %}<tr>{% for cell in row %}
{%- if t.shading and loop.index0 > 0 -%}
<td style="background: rgba(40, 90, 200, {{ '%.2f' % t.shading[outer][loop.index0 - 1] }})">{{ cell }}</td>
{%- else %}<td>{{ cell }}</td>{% endif %}{% endfor %}</tr>
{% endfor %}</table>
{% endfor %}{% for f in r.figures %}<h2>{{ f.title }}</h2><img class="figure" alt="{{ f.title }}" src="{{ f.uri }}">
{% endfor %}{% if r.examples %}<h2>{{ r.examples_title }}</h2>
{% for e in r.examples %}<div class="example"><p>{{ e.query }}</p>
{% for res in e.results %}<div class="result{% if res.hit %} hit{% endif %}">
{%- if res.image %}<img alt="{{ res.label }}" src="{{ thumbnail(res.image) }}">{% endif -%}
<span class="mark">{% if res.hit %}✓ {% endif %}</span>{{ res.label }}</div>
{% endfor %}</div>
{% endfor %}{% endif %}</body></html>
""")


def image_uri(image: Image.Image, size: int = THUMBNAIL) -> str:
    """A PNG thumbnail (at most size x size) as a data URI."""
    image = image.copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    """matplotlib's pyplot, headless, drawing text with a CJK font when one is installed."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps worker processes free of GUI backends
    from matplotlib import pyplot as plt

    plt.rcParams["font.family"] = [*_cjk_fonts(), "DejaVu Sans"]
    plt.rcParams["axes.unicode_minus"] = False  # CJK fonts often lack the Unicode minus sign
    return plt


@functools.cache
def _cjk_fonts() -> tuple[str, ...]:
    """The CJK_FONTS matplotlib can draw with, found once per process (the search walks the font folders)."""
    from matplotlib import font_manager

    cjk = _installed_cjk_fonts(font_manager.fontManager)
    if not cjk:  # matplotlib caches its font list: a font installed after the cache was built is added here
        for path in font_manager.findSystemFonts():
            if "cjk" in Path(path).name.lower():
                font_manager.fontManager.addfont(path)
        cjk = _installed_cjk_fonts(font_manager.fontManager)
    if not cjk:
        warnings.warn(
            "no CJK font is installed, so Chinese text in figures shows as empty boxes; install one "
            "(Debian: apt-get install fonts-noto-cjk, which `make system-deps` does)",
            stacklevel=4,
        )
    return tuple(cjk)


def _installed_cjk_fonts(manager) -> list[str]:
    installed = {font.name for font in manager.ttflist}
    return [name for name in CJK_FONTS if name in installed]


def _png_uri(fig) -> str:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def line_plot(
    series: Mapping[str, Sequence[float]], xlabel: str, ylabel: str, dashed: Callable[[str], bool] = lambda name: False
) -> str:
    """Lines over x = 1..n, one per series (dashed where `dashed(name)`), as a PNG data URI."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name, linestyle="--" if dashed(name) else "-")
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png_uri(fig)


def bar_plot(values: dict[str, float], ylabel: str, reference: float | None = None, reference_label: str = "") -> str:
    """One bar per label (Chinese labels drawn with the CJK font), an optional horizontal reference line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(values) + 1.5), 3.2), dpi=100)
    ax.bar(list(values), list(values.values()), color="#3a6fc4")
    if reference is not None:
        ax.axhline(reference, color="#c33", linestyle="--", label=reference_label)
        ax.legend(fontsize="small")
    ax.set(ylabel=ylabel, ylim=(0, 100))
    ax.grid(alpha=0.3, axis="y")
    return _png_uri(fig)


def render_html(report: Report) -> str:
    return _HTML.render(r=report, thumbnail=image_uri, fonts=CSS_FONT_STACK)


def markdown_table(rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines; the first row is the header."""
    header, *body = rows
    return [
        "| " + " | ".join(map(str, header)) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(map(str, row)) + " |" for row in body),
    ]


def render_markdown(report: Report) -> str:
    """The tables and example retrievals as Markdown (the Kubeflow UI's Markdown viewer shows it)."""
    lines = [f"# {report.title}", ""] + [f"- **{key}**: {value}" for key, value in report.notes.items()] + [""]
    for table in report.tables:
        lines += [f"## {table.title}", "", *markdown_table(table.rows), ""]
    if report.examples:
        lines += [f"## {report.examples_title}", ""]
        lines += [
            f"- {e.query}: " + ", ".join(("✓ " if r.hit else "") + r.label for r in e.results) for e in report.examples
        ]
    return "\n".join(lines) + "\n"


def write(report: Report, out_dir: str | Path) -> list[Path]:
    """report.html and report.md in out_dir; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html, markdown = out_dir / "report.html", out_dir / "report.md"
    html.write_text(render_html(report), encoding="utf-8")
    markdown.write_text(render_markdown(report), encoding="utf-8")
    return [html, markdown]


def log_to_mlflow(run: dict[str, str], metrics: dict[str, float], files: Sequence[Path], artifact_path: str) -> None:
    """Log metrics and files (under artifact_path) to an existing MLflow run: `run["run_id"]` at
    `run["tracking_uri"]`, else at $MLFLOW_TRACKING_URI or sqlite:///mlflow.db."""
    from mlflow.tracking import MlflowClient

    from zhclip.components.core.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(run.get("tracking_uri", "")))
    for key, value in metrics.items():
        client.log_metric(run["run_id"], key, value)
    for path in files:
        client.log_artifact(run["run_id"], str(path), artifact_path)
