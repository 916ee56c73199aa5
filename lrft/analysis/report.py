"""The reports of `lrft analyze`: report.html (figures embedded, a caption each, tables) and report.md."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from lrft.analysis.figures import Plot

ANALYSIS_FILE = "analysis.json"


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def module_rows(numbers: dict) -> tuple[list[str], list[list[str]]]:
    head = ["module", "shape", "rank", "‖ΔW‖_F", "effective rank", "σ₁"]
    rows = [
        [
            name,
            "×".join(map(str, v["shape"])),
            str(v["rank"]),
            fmt(v["fro_norm"]),
            fmt(v["effective_rank"]),
            fmt(v["singular_values"][0] if v["singular_values"] else None),
        ]
        for name, v in numbers["modules"].items()
    ]
    return head, rows


def compare_rows(cmp: dict) -> tuple[list[str], list[list[str]]]:
    head = ["module", "cosine", "φ left", "φ right", "φ rank r", "‖ΔW₁−ΔW₂‖/‖ΔW₂‖"]
    rows = [
        [
            n,
            fmt(cmp["cosine"]["per_module"][n]),
            fmt(cmp["subspace"]["left"]["per_module"][n]),
            fmt(cmp["subspace"]["right"]["per_module"][n]),
            str(cmp["subspace"]["rank"][n]),
            fmt(cmp["rel_frobenius"]["per_module"][n]),
        ]
        for n in cmp["cosine"]["per_module"]
    ]
    rows.append(
        [
            "mean",
            fmt(cmp["cosine"]["mean"]),
            fmt(cmp["subspace"]["left"]["mean"]),
            fmt(cmp["subspace"]["right"]["mean"]),
            "",
            fmt(cmp["rel_frobenius"]["mean"]),
        ]
    )
    return head, rows


def tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    out = [(f"Updates of {result['run']['label']} ({result['run']['method']})", *module_rows(result["run"]))]
    if "against" in result:
        out.append(
            (
                f"Updates of {result['against']['label']} ({result['against']['method']})",
                *module_rows(result["against"]),
            )
        )
        out.append(("Similarity per module", *compare_rows(result)))
    return out


def intro_lines(result: dict) -> list[str]:
    run = result["run"]
    base = run.get("base_model") or {}
    lines = [
        f"Run {run['label']} ({run['dir']}): method {run['method']}, base model {base.get('name')} "
        f"({base.get('model_type')}), {len(run['modules'])} modules analysed."
    ]
    if "against" in result:
        other = result["against"]
        lines.append(
            f"Compared against {other['label']} ({other['dir']}): method {other['method']}; "
            f"{len(result['cosine']['per_module'])} modules in common. Mean cosine "
            f"{fmt(result['cosine']['mean'])}, mean φ left {fmt(result['subspace']['left']['mean'])}, "
            f"right {fmt(result['subspace']['right']['mean'])}, mean relative Frobenius distance "
            f"{fmt(result['rel_frobenius']['mean'])}."
        )
        if result["unmatched"]:
            lines.append("Modules adapted by only one run (not compared): " + ", ".join(result["unmatched"]) + ".")
    lines.append("All quantities are taken on the updates ΔW (out × in, every scale applied), not on W0 + ΔW.")
    return lines


def render_html(result: dict, figures: list[Plot], out_dir: Path) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>lrft analyze: {e(result['run']['label'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
        "td{text-align:right}td:first-child{text-align:left}img{max-width:100%}"
        "figure{margin:2em 0}figcaption{color:#333}</style></head><body>",
        f"<h1>lrft analyze: {e(result['run']['label'])}</h1>",
    ]
    parts += [f"<p>{e(line)}</p>" for line in intro_lines(result)]
    parts.append("<h2>Figures</h2>")
    for f in figures:
        data = base64.b64encode((out_dir / f.file).read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{e(f.file)}">'
            f"<figcaption><b>{e(f.file)}</b>: {e(f.caption)}</figcaption></figure>"
        )
    parts.append("<h2>Tables</h2>")
    for title, head, rows in tables(result):
        parts.append(f"<h3>{e(title)}</h3><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append(
        f"<p>Numbers: {ANALYSIS_FILE}. Definitions: {e(result['definitions']['effective_rank'])} "
        f"{e(result['definitions']['subspace_similarity'])}</p></body></html>"
    )
    return "\n".join(parts) + "\n"


def render_markdown(result: dict, figures: list[Plot]) -> str:
    lines = [f"# lrft analyze: {result['run']['label']}", ""] + [line + "\n" for line in intro_lines(result)]
    lines += ["## Figures", ""]
    for f in figures:
        lines += [f"![{f.file}]({f.file})", "", f"*{f.caption}*", ""]
    lines += ["## Tables", ""]
    for title, head, rows in tables(result):
        lines += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    lines += [
        f"Numbers: `{ANALYSIS_FILE}`. {result['definitions']['effective_rank']} "
        f"{result['definitions']['subspace_similarity']}",
        "",
    ]
    return "\n".join(lines)
