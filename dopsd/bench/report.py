"""The bench report: results.json (its schema: FIELD_DOCS), curves (PNG), image grids, Markdown and HTML.

The report is built as a list of blocks (heading, paragraph, table, image) rendered twice: to Markdown with
relative image links and to one self-contained HTML file with the PNGs inlined as base64.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch

# The methods every setting must report (the paper's comparison), and the per-method fields results.json must carry.
REQUIRED_METHODS = (
    "base",
    "sft",
    "sft_adapter",
    "dopsd",
    "dopsd_base_teacher",
    "dopsd_live_teacher",
    "pso",
    "dreambooth",
    "offpolicy",
    "sft_teacher",
)
# The continual setting's block: per method and sequence, one row per round (0 = the untouched model) with these.
CONTINUAL_FIELDS = (
    "round",
    "target",
    "new_fidelity",
    "retention",
    "fewstep_quality",
    "preservation",
    "unrelated_accuracy",
    "drift",
    "seeds",
)
REQUIRED_FIELDS = (
    "concept_fidelity",
    "fewstep_quality",
    "manystep_quality",
    "unseen_prompt_fidelity",
    "preservation",
    "sec_per_step",
    "peak_mem_mb",
    "seeds",
)
# Fields that are null for the untrained `base` (nothing was trained, so no step cost).
COST_FIELDS = (
    "sec_per_step",
    "peak_mem_mb",
    "time_ratio_vs_sft",
    "flop_ratio_vs_sft",
    "overhead_vs_flops",
    "mem_ratio_vs_sft",
    "flops_per_step",
    "train_sec_per_step",
)

# field -> (meaning, direction). The direction is what the report's verdicts assume; documented in the report.
FIELD_DOCS: dict[str, tuple[str, str]] = {
    "concept_fidelity": (
        "fraction of 4-step samples on the training prompts whose decoded attribute is the target "
        "concept (concept setting) or the target domain (domain setting)",
        "higher",
    ),
    "unseen_prompt_fidelity": (
        "the same fraction on prompts never seen in training (new shapes, backgrounds, combinations)",
        "higher",
    ),
    "fewstep_quality": (
        "quality of 4-step samples on unrelated prompts: the miniature's quality score (see "
        "Metrics), higher = sharper / closer to the base model's many-step output",
        "higher",
    ),
    "manystep_quality": ("the same quality score for many-step samples of the same network (the control)", "higher"),
    "preservation": (
        "fraction of unrelated-prompt samples whose decoded scene matches the untouched turbo's for the "
        "same noise: same shape, colour and background names, centre within 1.5 px, extent within "
        "1.5 px (see Metrics)",
        "higher",
    ),
    "unrelated_accuracy": (
        "fraction of unrelated-prompt samples whose captioned attributes (shape, colour, background) "
        "are all decoded right: does 'a red square' still come out a red square",
        "higher",
    ),
    "position_shift_px": (
        "mean shift of the shape's centre (px) against the untouched turbo's sample, same shape only",
        "lower",
    ),
    "size_change_px": (
        "mean |change| of the shape's extent (px) against the untouched turbo's sample, same shape only",
        "lower",
    ),
    "drift": (
        "mean squared difference to the untouched turbo's 4-step output for the same noise and prompt, on "
        "unrelated prompts",
        "lower",
    ),
    "sec_per_step": ("median wall seconds of one optimizer step, all methods interleaved in one process", "lower"),
    "time_ratio_vs_sft": ("sec_per_step / SFT's, measured in the same run", "lower"),
    "flop_ratio_vs_sft": (
        "FLOPs the algorithm implies per step / SFT's (counted from the network's actual ops)",
        "lower",
    ),
    "overhead_vs_flops": (
        "time_ratio_vs_sft / flop_ratio_vs_sft; 1 = costs exactly its arithmetic, > 1 = overhead beyond the algorithm",
        "lower",
    ),
    "peak_mem_mb": (
        "peak tensor memory of one optimizer step in MiB (resident weights, gradients, optimizer and "
        "teacher state + transient peak)",
        "lower",
    ),
    "mem_ratio_vs_sft": ("peak_mem_mb / SFT's", "lower"),
    "flops_per_step": ("FLOPs counted over one whole optimizer step", "lower"),
    "train_sec_per_step": (
        "the trainer's own mean seconds per step in the training runs (includes data, logging; "
        "runs were not interleaved)",
        "lower",
    ),
    "seeds": ("number of training seeds (each *_std field is the standard deviation over all runs)", "-"),
    "runs": ("runs averaged: targets × seeds", "-"),
    "steps": ("optimizer steps of each run (0 = not trained)", "-"),
    "sharpness": (
        "mean |Laplacian| of the 4-step samples on unrelated prompts (clean renders set the scale)",
        "higher",
    ),
    "render_psnr": (
        "PSNR (dB) of 4-step unrelated samples to their best-fitting clean render; blur and speckle lower it",
        "higher",
    ),
    "attribute_accuracy": (
        "fraction of captioned attributes (shape, colour, background) decoded right on unrelated "
        "prompts, tint-invariant",
        "higher",
    ),
    "fewstep_quality_concept": ("fewstep_quality on the training prompts' samples", "higher"),
    "concept_leak": ("fraction of unrelated-prompt samples showing the concept colour (concept setting)", "lower"),
    "domain_on_unrelated": ("fraction of unrelated-prompt samples in the new domain (domain setting; intended)", "-"),
}

Block = tuple[str, Any]


def is_trained(method: str) -> bool:
    """`base` and the `ref_*` reference rows are evaluated without training (no step cost)."""
    return method != "base" and not method.startswith("ref_")  # ("h1"|"h2"|"h3"|"p"|"table"|"img"|"code", payload)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, tensors → lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def validate_results(results: dict[str, Any], required: Iterable[str] = REQUIRED_METHODS) -> list[str]:
    """Every problem with a results dict (empty list = complete and consistent). `required`: the methods every
    setting must have (all of REQUIRED_METHODS unless the run was restricted with --methods)."""
    problems: list[str] = []
    if not results:
        return ["results.json has no settings"]
    for setting, block in results.items():
        if set(block) != {"setting", "methods"}:
            problems.append(f"{setting}: keys must be 'setting' and 'methods', got {sorted(block)}")
            continue
        methods = block["methods"]
        if (block["setting"] or {}).get("kind") == "continual":
            problems += _continual_problems(setting, methods)
            continue
        for name in required:
            if name not in methods:
                problems.append(f"{setting}: method {name!r} missing")
        for name, row in methods.items():
            for field in REQUIRED_FIELDS:
                if field not in row:
                    problems.append(f"{setting}/{name}: field {field!r} missing")
                    continue
                value = row[field]
                if field in COST_FIELDS and not is_trained(name):
                    if value is not None:
                        problems.append(f"{setting}/{name}: {field} must be null (nothing is trained)")
                elif field == "seeds":
                    if not isinstance(value, int) or value < 1:
                        problems.append(f"{setting}/{name}: seeds must be a positive int, got {value!r}")
                elif not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                    problems.append(f"{setting}/{name}: {field} must be a finite number, got {value!r}")
    return problems


def _continual_problems(setting: str, methods: dict[str, Any]) -> list[str]:
    problems = [] if methods else [f"{setting}: no method"]
    for name, sequences in methods.items():
        for seq, block in sequences.items():
            for row in block.get("rounds") or [None]:
                missing = [f for f in CONTINUAL_FIELDS if row is None or f not in row]
                if missing:
                    problems.append(f"{setting}/{name}/{seq}: round fields {missing} missing")
    return problems


def write_results(path: Path, results: dict[str, Any], required: Iterable[str] = REQUIRED_METHODS) -> None:
    problems = validate_results(results, required)
    if problems:
        raise ValueError("bench results are incomplete: " + "; ".join(problems))
    path.write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")


# --- figures ----------------------------------------------------------------------------------------------


def image_grid(rows: list[torch.Tensor], scale: int = 3, pad: int = 2, labels: list[str] | None = None) -> "Any":
    """A PIL image: one row per tensor (N, 3, H, W) in [-1, 1], nearest-neighbour upscaled by `scale`, with an
    optional text label left of each row."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("image_grid needs at least one row")
    h, w = rows[0].shape[-2:]
    cols = max(int(r.shape[0]) for r in rows)
    canvas = torch.ones(3, len(rows) * (h + pad) + pad, cols * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, y : y + h, x : x + w] = (img.float().clamp(-1, 1) + 1) / 2
    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if not labels:
        return image
    margin = 8 + 7 * max(len(t) for t in labels)  # the default bitmap font is ~6–7 px per character
    framed = Image.new("RGB", (image.width + margin, image.height), "white")
    framed.paste(image, (margin, 0))
    draw = ImageDraw.Draw(framed)
    for i, text in enumerate(labels):
        draw.text((4, (pad + i * (h + pad) + h // 2) * scale - 6), text, fill="black")
    return framed


def plot_curves(curves: dict[str, Any], path: Path, title: str) -> Path:
    """curves = {"steps": [...], "metrics": {metric: {method: [[per-step values] per seed]}}}: mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = curves["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    steps = curves["steps"]
    for ax, (metric, per_method) in zip(axes[0], metrics.items()):
        for method, runs in per_method.items():
            values = torch.tensor(runs, dtype=torch.float64)  # (seeds, points)
            mean = values.mean(0)
            std = values.std(0, unbiased=False)
            ax.plot(steps, mean.tolist(), marker="o", markersize=3, label=f"{method} (n={values.shape[0]})")
            ax.fill_between(steps, (mean - std).tolist(), (mean + std).tolist(), alpha=0.2)
        arrow = FIELD_DOCS.get(metric, ("", "higher"))[1]
        ax.set_title(f"{metric} ({arrow} = better)", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- Markdown / HTML ----------------------------------------------------------------------------------------


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


def field_doc_table(fields: Iterable[str]) -> list[list[str]]:
    rows = [["field", "meaning", "better"]]
    for f in fields:
        meaning, direction = FIELD_DOCS[f]
        rows.append([f"`{f}`", meaning, direction])
    return rows


__all__ = [
    "FIELD_DOCS",
    "REQUIRED_FIELDS",
    "REQUIRED_METHODS",
    "fmt",
    "field_doc_table",
    "image_grid",
    "plot_curves",
    "results_table",
    "to_html",
    "to_markdown",
    "validate_results",
    "write_report",
    "write_results",
]
