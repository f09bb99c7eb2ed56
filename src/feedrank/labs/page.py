"""``OUT/index.html``: one self-contained page with every lab that has run into ``OUT``.

Built from the files alone (``OUT/<lab>/result.json`` and the PNGs it names), so it can be rebuilt
at any time and shows whatever labs have finished: one section per lab (``id="lab-<name>"``), in
the registry's order, with its title, run facts, summary, tables and plots. Plots are embedded as
``data:`` URIs and the style is inline: no scripts, no network, nothing to load but the file.

Example::

    build_page(Path("runs/labs"))          # -> runs/labs/index.html
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from feedrank.labs.base import RESULT_FILE, LabResult, Table, read_result

PAGE_FILE = "index.html"

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } nav a { margin-right: 1em; }
section { border-top: 1px solid #ccc; margin-top: 2em; padding-top: 0.5em; }
.facts { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.85em; }
"""


def collect(root: Path) -> list[LabResult]:
    """Every ``root/*/result.json``, registered labs first in registry order, then others by name."""
    from feedrank.labs import LABS

    results = [read_result(path) for path in sorted(Path(root).glob(f"*/{RESULT_FILE}"))]
    order = {name: i for i, name in enumerate(LABS)}
    return sorted(results, key=lambda r: (order.get(r.name, len(order)), r.name))


def _cell(value: object) -> str:
    from feedrank.labs import format_cell

    return html.escape(format_cell(value))


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in table.rows)
    return f"<table><caption>{html.escape(table.title)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(folder: Path, plot: str) -> str:
    path = folder / plot
    if not path.is_file():
        raise FileNotFoundError(f"{folder / RESULT_FILE} names plot {plot!r}, which is not in {folder}")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(plot)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{name}" data-plot="{name}">'
            f"<figcaption>{name}</figcaption></figure>")  # fmt: skip


def _section(root: Path, result: LabResult) -> str:
    facts = f"device {result.device}" + (", quick" if result.quick else "")
    if result.elapsed_s is not None:
        facts += f", {result.elapsed_s:.1f} s"
    paragraphs = "".join(f"<p>{html.escape(p.strip())}</p>" for p in result.summary.split("\n\n") if p.strip())
    parts = [
        f'<section id="lab-{html.escape(result.name)}">',
        f"<h2>{html.escape(result.title)}</h2>",
        f'<p class="facts">lab <code>{html.escape(result.name)}</code>, {html.escape(facts)}</p>',
        paragraphs,
        *(_table(t) for t in result.tables),
        *(_figure(root / result.name, p) for p in result.plots),
        "</section>",
    ]
    return "\n".join(parts)


def render(root: Path) -> str:
    """The page's HTML for the results under ``root``."""
    results = collect(root)
    nav = " ".join(f'<a href="#lab-{html.escape(r.name)}">{html.escape(r.name)}</a>' for r in results)
    sections = "\n".join(_section(Path(root), r) for r in results) or "<p>No lab has run into this folder yet.</p>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>feedrank labs</title>"
        '<link rel="icon" href="data:,">'  # no favicon request (a 404 in the console otherwise)
        f"<style>{_STYLE}</style></head><body>"
        "<h1>feedrank labs</h1><p>PyTorch tradeoffs measured on feedrank's own models and data. "
        "Regenerate with <code>feedrank lab all --out DIR</code>.</p>"
        f"<nav>{nav}</nav>\n{sections}\n</body></html>\n"
    )


def build_page(root: Path) -> Path:
    """Write ``root/index.html`` (atomically) and return its path."""
    from feedrank.fsutil import staged_file

    path = Path(root) / PAGE_FILE
    with staged_file(path) as tmp:
        tmp.write_text(render(Path(root)), encoding="utf-8")
    return path
