"""Self-contained reports: ``report.md`` (Markdown, images by relative path) and ``report.html``
(one file, images embedded as base64 data URIs, minimal CSS), both written atomically.

A report is a title and a list of sections; a section has a heading, paragraphs, tables and images,
rendered in that order. Sections, tables and images can be given as the dataclasses below or as
plain values::

    write_report(out, "Omniglot 5-way 1-shot", [
        {"heading": "Removal", "paragraphs": ["Top 40% harmful tasks removed."],
         "tables": [[{"method": "task-IF", "acc": (0.78, 0.01), "time_s": 65.7}]],
         "images": ["accuracy_vs_removed.png"]},
    ])

Table rows are dicts (column → value); floats are formatted with ``floatfmt``, a ``(mean, half_width)``
pair as ``mean ± half_width``. Images are PNG files in ``out_dir`` named by relative path.
Paragraphs may use ``code``, **bold** and [links](url); that much is carried over to the HTML.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import SettingsError
from ..io import atomic_write_bytes

__all__ = ["Section", "Table", "Image", "SIGN_CONVENTION", "markdown_table", "write_report"]

SIGN_CONVENTION = (
    "Sign convention: an item's score is the predicted change of the validation measurement f when the "
    "item is removed. score > 0: removing it would raise the loss — the item helps; score < 0: removing it "
    "would lower the loss — the item harms. Harmful-first rankings sort scores ascending."
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Table:
    """Rows (dicts column → value), optional column order, caption and float format."""

    rows: Sequence[Mapping[str, Any]]
    columns: Sequence[str] | None = None
    caption: str = ""
    floatfmt: str = ".4f"


@dataclass
class Image:
    """A PNG in the report folder, by path relative to it, with an optional caption."""

    path: str
    caption: str = ""


@dataclass
class Section:
    heading: str
    paragraphs: Sequence[str] = ()
    tables: Sequence[Table] = ()
    images: Sequence[Image] = ()
    level: int = 2


# ---------------------------------------------------------------------------------------------
# cells and tables
# ---------------------------------------------------------------------------------------------

def _format_float(x: float, floatfmt: str) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    m = re.fullmatch(r"\.(\d+)f", floatfmt)
    if m and x != 0.0:
        digits = int(m.group(1))
        # fixed point would print a small nonzero value (e.g. an influence score ~1e-6) as 0.0000
        if abs(x) < 0.5 * 10.0 ** (-digits):
            return f"{x:.{max(digits - 1, 1)}e}"
    try:
        return format(x, floatfmt)
    except ValueError:
        raise SettingsError(f"floatfmt={floatfmt!r} is not a float format; use e.g. '.4f' or '.3g'") from None


def _format_cell(v: Any, floatfmt: str) -> str:
    if v is None:
        return ""
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy / torch scalar
        v = v.item()
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, Integral):
        return str(int(v))
    if isinstance(v, Real):
        return _format_float(float(v), floatfmt)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(u, Real) and not isinstance(u, bool) for u in v):
        return f"{_format_float(float(v[0]), floatfmt)} ± {_format_float(float(v[1]), floatfmt)}"
    return str(v)


def _is_numeric(v: Any) -> bool:
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        v = v.item()
    if isinstance(v, bool):
        return False
    if isinstance(v, Real):
        return True
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(u, Real) for u in v)


def _table_cells(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None, floatfmt: str) -> tuple[list[str], list[list[str]], list[bool]]:
    """Column names, formatted cells, and whether each column is numeric (right-aligned)."""
    if isinstance(rows, (Mapping, str, bytes)) or not hasattr(rows, "__iter__"):
        raise SettingsError("table rows must be a list of dicts (column → value); wrap a single row in a list")
    rows = list(rows)
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise SettingsError(f"table row {i} is a {type(r).__name__}, not a dict; pass rows as dicts column → value")
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    columns = [str(c) for c in columns]
    if not columns:
        raise SettingsError("table has no rows and no columns; pass at least one row or the column names")
    cells = [[_format_cell(r.get(c), floatfmt) for c in columns] for r in rows]
    numeric = []
    for c in columns:
        vals = [r.get(c) for r in rows if r.get(c) is not None]
        numeric.append(bool(vals) and all(_is_numeric(v) for v in vals))
    return columns, cells, numeric


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4f") -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts); ``columns`` defaults to the keys in order
    of first appearance. Floats use ``floatfmt`` (small nonzero values switch to scientific notation
    rather than print as zero), ``(mean, half_width)`` pairs print as ``mean ± half_width``, missing
    values are empty, numeric columns are right-aligned. Ends without a trailing newline."""
    cols, cells, numeric = _table_cells(rows, columns, floatfmt)
    head = "| " + " | ".join(_md_escape(c) for c in cols) + " |"
    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    body = ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in cells]
    return "\n".join([head, rule, *body])


def _html_table(table: Table) -> str:
    cols, cells, numeric = _table_cells(table.rows, table.columns, table.floatfmt)
    out = ["<table>"]
    if table.caption:
        out.append(f"<caption>{_inline_html(table.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead>")
    out.append("<tbody>")
    for row in cells:
        tds = "".join(f'<td class="num">{html.escape(v)}</td>' if n else f"<td>{html.escape(v)}</td>" for v, n in zip(row, numeric))
        out.append(f"<tr>{tds}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# normalising sections
# ---------------------------------------------------------------------------------------------

def _as_table(t: Any, where: str) -> Table:
    if isinstance(t, Table):
        return t
    if isinstance(t, Mapping):
        if "rows" not in t:
            raise SettingsError(f"{where} is a dict without 'rows'; pass a list of row dicts or {{'rows': [...], 'caption': ...}}")
        unknown = set(t) - {"rows", "columns", "caption", "floatfmt"}
        if unknown:
            raise SettingsError(f"{where} has unknown key(s) {sorted(unknown)}; use rows, columns, caption, floatfmt")
        return Table(**t)
    if isinstance(t, (list, tuple)):
        return Table(rows=t)
    raise SettingsError(f"{where} is a {type(t).__name__}; pass a list of row dicts, a dict with 'rows', or a Table")


def _as_image(im: Any, where: str) -> Image:
    if isinstance(im, Image):
        return im
    if isinstance(im, (str, os.PathLike)):
        return Image(path=str(im))
    if isinstance(im, Mapping) and "path" in im:
        return Image(path=str(im["path"]), caption=str(im.get("caption", "")))
    if isinstance(im, (tuple, list)) and len(im) == 2:
        return Image(path=str(im[0]), caption=str(im[1]))
    raise SettingsError(f"{where} is a {type(im).__name__}; pass a relative PNG path, (path, caption) or an Image")


def _as_section(s: Any, i: int) -> Section:
    if isinstance(s, Section):
        sec = s
    elif isinstance(s, Mapping):
        if "heading" not in s:
            raise SettingsError(f"section {i} has no 'heading'; give every section a heading")
        unknown = set(s) - {"heading", "paragraphs", "tables", "images", "level"}
        if unknown:
            raise SettingsError(f"section {i} has unknown key(s) {sorted(unknown)}; use heading, paragraphs, tables, images, level")
        sec = Section(**s)
    else:
        raise SettingsError(f"section {i} is a {type(s).__name__}; pass a dict with 'heading' or a Section")
    paragraphs = [sec.paragraphs] if isinstance(sec.paragraphs, str) else list(sec.paragraphs)
    # a single table (list of row dicts) given directly, rather than a list of tables
    tables_in = sec.tables
    if isinstance(tables_in, (list, tuple)) and tables_in and all(isinstance(r, Mapping) and "rows" not in r for r in tables_in):
        tables_in = [tables_in]
    elif isinstance(tables_in, (Table, Mapping)):
        tables_in = [tables_in]
    images_in = [sec.images] if isinstance(sec.images, (str, os.PathLike, Image)) else list(sec.images)
    level = int(sec.level)
    if not 1 <= level <= 6:
        raise SettingsError(f"section {i} has heading level {sec.level}; use 1..6")
    return Section(
        heading=str(sec.heading),
        paragraphs=[str(p) for p in paragraphs],
        tables=[_as_table(t, f"table {j} of section {i}") for j, t in enumerate(tables_in)],
        images=[_as_image(im, f"image {j} of section {i}") for j, im in enumerate(images_in)],
        level=level,
    )


def _resolve_image(out_dir: Path, image: Image) -> tuple[str, bytes]:
    """The image's path relative to ``out_dir`` (POSIX form) and its bytes."""
    p = Path(image.path)
    full = p if p.is_absolute() else out_dir / p
    try:
        rel = full.resolve().relative_to(out_dir.resolve())
    except ValueError:
        raise SettingsError(f"image {image.path} is outside the report folder {out_dir}; save figures into that folder") from None
    if not full.is_file():
        raise SettingsError(f"image {image.path} does not exist in {out_dir}; create the figure before writing the report")
    data = full.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise SettingsError(f"image {image.path} is not a PNG file; save figures as PNG")
    return rel.as_posix(), data


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _inline_html(text: str) -> str:
    """Escape ``text`` and carry over Markdown `code`, **bold** and [links](url)."""
    pieces = []
    last = 0
    for m in _CODE.finditer(text):  # code spans first so their contents stay literal
        pieces.append(_inline_rest(text[last:m.start()]))
        pieces.append(f"<code>{html.escape(m.group(1))}</code>")
        last = m.end()
    pieces.append(_inline_rest(text[last:]))
    return "".join(pieces)


def _inline_rest(text: str) -> str:
    s = html.escape(text)
    s = _BOLD.sub(r"<strong>\1</strong>", s)

    def link(m: re.Match) -> str:
        url = html.unescape(m.group(2))
        if re.match(r"(?i)\s*javascript:", url):
            return m.group(1)
        return f'<a href="{html.escape(url, quote=True)}">{m.group(1)}</a>'

    return _LINK.sub(link, s)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.5; }
h1, h2, h3 { line-height: 1.25; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .92rem; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: .3rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1rem 0; }
img { max-width: 100%; height: auto; }
figcaption { font-size: .9rem; color: #555; }
code { background: #f3f3f3; padding: 0 .2rem; border-radius: 3px; }
p.convention { font-size: .92rem; color: #444; background: #f7f7f2; border-left: 3px solid #bbb; padding: .4rem .7rem; }
""".strip()


def _render(title: str, sections: list[Section], images: dict[str, bytes], sign_convention: bool) -> tuple[str, str]:
    md: list[str] = [f"# {title.strip()}", ""]
    body: list[str] = [f"<h1>{html.escape(title.strip())}</h1>"]
    if sign_convention:
        md += [f"> {SIGN_CONVENTION}", ""]
        body.append(f'<p class="convention">{html.escape(SIGN_CONVENTION)}</p>')
    for sec in sections:
        hashes = "#" * sec.level
        md += [f"{hashes} {sec.heading.strip()}", ""]
        body.append(f"<h{sec.level}>{html.escape(sec.heading.strip())}</h{sec.level}>")
        for p in sec.paragraphs:
            md += [p.strip(), ""]
            body.append(f"<p>{_inline_html(p.strip())}</p>")
        for t in sec.tables:
            if t.caption:
                md += [f"*{t.caption.strip()}*", ""]
            md += [markdown_table(t.rows, t.columns, t.floatfmt), ""]
            body.append(_html_table(t))
        for im in sec.images:
            rel, data = images[im.path]
            alt = im.caption or Path(rel).stem
            md += [f"![{_md_escape(alt).replace(']', '')}]({rel.replace(' ', '%20')})", ""]
            if im.caption:
                md += [f"*{im.caption.strip()}*", ""]
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            cap = f"<figcaption>{_inline_html(im.caption)}</figcaption>" if im.caption else ""
            body.append(f'<figure><img src="{uri}" alt="{html.escape(alt, quote=True)}">{cap}</figure>')
    markdown = "\n".join(md).rstrip() + "\n"
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title.strip())}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    return markdown, page


def write_report(out_dir: str | os.PathLike, title: str, sections: Sequence[Section | Mapping[str, Any]],
                 sign_convention: bool = True) -> Path:
    """Write ``out_dir/report.md`` and the self-contained ``out_dir/report.html``; return the Markdown path.

    ``sections``: :class:`Section` objects or dicts with ``heading`` and optional ``paragraphs``
    (list of str, or one str), ``tables`` (list of tables; a table is a list of row dicts, a dict
    ``{"rows", "columns", "caption", "floatfmt"}`` or a :class:`Table`), ``images`` (PNG paths
    relative to ``out_dir``, ``(path, caption)`` pairs or :class:`Image`) and ``level`` (2).
    With ``sign_convention`` the score sign convention of docs/method.md §5 is stated under the title.
    Both files are written atomically; nothing is written if any input is invalid.
    """
    out = Path(out_dir)
    if not str(title).strip():
        raise SettingsError("report title is empty; pass a title")
    if isinstance(sections, (Mapping, Section)):
        sections = [sections]
    secs = [_as_section(s, i) for i, s in enumerate(sections)]
    images: dict[str, tuple[str, bytes]] = {}
    for sec in secs:
        for im in sec.images:
            if im.path not in images:
                images[im.path] = _resolve_image(out, im)
    markdown, page = _render(str(title), secs, images, sign_convention)
    md_path = atomic_write_bytes(out / "report.md", markdown.encode("utf-8"))
    atomic_write_bytes(out / "report.html", page.encode("utf-8"))
    return md_path
