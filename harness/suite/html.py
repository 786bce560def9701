"""Static HTML for the report and the leaderboard: one stylesheet, one sortable table, inline images.

Pages are self-contained (inline CSS, inline vanilla JS, images as data URIs) so they open offline.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from html import escape

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1, h2, h3 { font-weight: 600; } h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table.sortable { border-collapse: collapse; margin: .8em 0; }
table.sortable th, table.sortable td { border: 1px solid #ccc; padding: .3em .6em; text-align: left;
  vertical-align: top; }
table.sortable th { background: #f3f3f3; cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.sub, .ci { color: #666; font-size: .85em; font-weight: normal; }
.flag { color: #a40; font-size: .85em; font-weight: normal; display: block; }
.rank { display: inline-block; min-width: 2.2em; font-weight: 600; }
.na { color: #999; } .warn { color: #a40; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0 0 .4em 1.5em; }
"""

# Click a header to sort by that column (again to reverse). Cells sort by their data-sort
# attribute (numbers numerically, else text); an empty key (missing, n/a) always sorts last.
SORT_JS = """
(function () {
  function key(row, col) {
    var cell = row.cells[col];
    var k = cell.getAttribute("data-sort");
    return k === null ? cell.textContent.trim() : k;
  }
  function compare(a, b, asc) {
    if (a === "" || b === "") { return a === b ? 0 : (a === "" ? 1 : -1); }
    var x = Number(a), y = Number(b);
    var r = (isNaN(x) || isNaN(y)) ? a.localeCompare(b) : x - y;
    return asc ? r : -r;
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.addEventListener("click", function () {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) { return compare(key(a, col), key(b, col), asc); });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
"""


@dataclass(frozen=True)
class Column:
    """A table column: `label` on the first line, `sub` below it, `flag` as a warning line."""

    key: str
    label: str
    sub: str = ""
    flag: str = ""


@dataclass(frozen=True)
class Cell:
    """A table cell: `html` (already escaped) is shown, `sort` is its sort key ("" sorts last)."""

    html: str
    sort: str = ""
    numeric: bool = False


def text_cell(text: str, sort: str | None = None) -> Cell:
    return Cell(escape(text), text if sort is None else sort)


def interval_cell(value: float | None, ci_low: float | None, ci_high: float | None, status: str = "ok",
                  prefix: str = "") -> Cell:
    """`value [ci_low, ci_high]`, or "n/a" for a method the task does not apply to.

    Args:
        prefix: HTML put before the value (e.g. a rank badge).
    """
    if status == "not_applicable":
        return Cell('<span class="na">n/a</span>')
    if status != "ok":
        return Cell(f'<span class="warn">{escape(status)}</span>')
    if value is None:  # e.g. a rank correlation of constant scores
        return Cell('<span class="na">undefined</span>')
    ci = f' <span class="ci">[{ci_low:+.3f}, {ci_high:+.3f}]</span>' if ci_low is not None else ""
    return Cell(f"{prefix}{value:+.3f}{ci}", repr(float(value)), numeric=True)


NUM = ' class="num"'


def table(columns: list[Column], rows: list[dict[str, Cell]], table_id: str) -> str:
    """A sortable table; each row maps column keys to cells (a missing key is an empty cell)."""
    head = "".join(_th(c) for c in columns)
    body = []
    for row in rows:
        cells = [row.get(c.key, Cell("")) for c in columns]
        tds = "".join(f'<td{NUM if c.numeric else ""} data-sort="{escape(c.sort)}">{c.html}</td>' for c in cells)
        body.append(f"<tr>{tds}</tr>")
    return (f'<table class="sortable" id="{escape(table_id)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _th(column: Column) -> str:
    sub = f'<br><span class="sub">{escape(column.sub)}</span>' if column.sub else ""
    flag = f'<span class="flag">&#9888; sanity failed: {escape(column.flag)}</span>' if column.flag else ""
    return f'<th scope="col" data-key="{escape(column.key)}">{escape(column.label)}{sub}{flag}</th>'


def png_figure(png: bytes, alt: str, caption: str = "") -> str:
    """A PNG embedded as a base64 data URI, so the page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def page(title: str, body: str) -> str:
    """A complete HTML document (ASCII, non-ASCII as character references) with the shared style
    and the table-sorting script."""
    text = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"<script>{SORT_JS}</script>\n</body></html>\n")
    return text.encode("ascii", "xmlcharrefreplace").decode("ascii")  # the same bytes in any locale
