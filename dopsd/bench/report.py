"""Rendering the bench report: numbers formatted for tables, the per-method results table, and the report as a
list of blocks (heading, paragraph, table, image, code) rendered twice: to Markdown with relative image links and to
one self-contained HTML file with the PNGs inlined as base64.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Iterable

Block = tuple[str, Any]  # ("h1"|"h2"|"h3"|"p"|"table"|"img"|"code", payload)


def fmt(value: Any, std: Any = None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    v = float(value)
    text = f"{v:.{digits}g}" if abs(v) >= 1000 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    if std is not None and isinstance(std, (int, float)) and math.isfinite(float(std)):
        text += f" ± {float(std):.{digits}f}"
    return text


def results_table(methods: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Header + one row per method: quality fields as mean ± std over seeds, cost with ratios to SFT."""
    columns = [
        ("concept_fidelity", "fidelity ↑"),
        ("unseen_prompt_fidelity", "unseen fidelity ↑"),
        ("fewstep_quality", "few-step quality ↑"),
        ("manystep_quality", "many-step quality ↑"),
        ("preservation", "preservation ↑"),
        ("drift", "drift ↓"),
    ]
    rows = [
        ["method"] + [label for _, label in columns] + ["s/step (×SFT)", "FLOPs ×SFT", "overhead", "peak MiB", "seeds"]
    ]
    for name, row in methods.items():
        cells = [f"`{name}`"] + [fmt(row.get(k), row.get(f"{k}_std")) for k, _ in columns]
        sec = row.get("sec_per_step")
        ratio = fmt(row.get("time_ratio_vs_sft"), digits=2)
        cells.append("–" if sec is None else f"{fmt(sec, digits=4)} ({ratio}×)")
        cells += [
            fmt(row.get("flop_ratio_vs_sft"), digits=2),
            fmt(row.get("overhead_vs_flops"), digits=2),
            fmt(row.get("peak_mem_mb"), digits=2),
            fmt(row.get("seeds")),
        ]
        rows.append(cells)
    return rows


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def to_markdown(blocks: Iterable[Block]) -> str:
    out: list[str] = []
    for kind, payload in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + payload)
        elif kind == "p":
            out.append(payload)
        elif kind == "code":
            out.append("```\n" + payload + "\n```")
        elif kind == "table":
            out.append(_md_table(payload))
        elif kind == "img":
            path, caption = payload
            out.append(f"![{caption}]({path})")
        else:
            raise ValueError(f"unknown report block {kind!r}")
    return "\n\n".join(out) + "\n"


def _inline_md(text: str) -> str:
    """The little Markdown the report's paragraphs use: `code` and **bold**."""
    import re

    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def to_html(blocks: Iterable[Block], root: Path, title: str) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;"
        "line-height:1.4}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #bbb;padding:3px 6px;"
        "text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%;image-rendering:pixelated}}"
        "code,pre{{background:#f3f3f3}}</style></head><body>",
    ]
    for kind, payload in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(payload)}</{kind}>")
        elif kind == "p":
            parts.append("<p>" + _inline_md(payload).replace("\n", "<br>") + "</p>")
        elif kind == "code":
            parts.append(f"<pre>{html.escape(payload)}</pre>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_md(c)}</th>" for c in payload[0])
            body = "".join("<tr>" + "".join(f"<td>{_inline_md(c)}</td>" for c in r) + "</tr>" for r in payload[1:])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "img":
            path, caption = payload
            data = base64.b64encode((root / path).read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: Path, blocks: list[Block], title: str) -> tuple[Path, Path]:
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(blocks))
    page.write_text(to_html(blocks, out, title))
    return md, page


__all__ = ["Block", "fmt", "results_table", "to_html", "to_markdown", "write_report"]
