"""Human-readable renderings of analyses and conversion reports (terminal tables and Markdown)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "human_bytes", "quality_line", "render_analysis_text", "render_conversion_text",
           "render_report_markdown"]


def human_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit (up to GB) that leaves at least 1: ``512 B``, ``3.4 MB``."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells[1:]]
    return "\n".join(lines)


def _shape(d: dict[str, Any]) -> str:
    act = ("gated " if d["gated"] else "") + d["activation"]
    return f"{d['in_features']}->{d['hidden_features']}->{d['out_features']} {act}"


def render_analysis_text(analysis: dict[str, Any], model_name: str) -> str:
    ffns = analysis["ffns"]
    out = [f"{model_name}: {len(ffns)} FFN(s) found, {sum(f['selected'] for f in ffns)} selected for conversion"]
    if ffns:
        rows = [[i, f["name"] or "(root)", f["rule"], _shape(f), f["capture"], "yes" if f["selected"] else "no"]
                for i, f in enumerate(ffns)]
        out.append(format_table(["#", "ffn", "rule", "shape", "captured by", "convert"], rows))
    misses = analysis["near_misses"]
    if misses:
        out.append("")
        out.append(f"near-misses ({len(misses)}): not converted, and why")
        out += [f"  - {m['where']}: {m['reason']}" for m in misses]
    return "\n".join(out)


def render_conversion_text(report: dict[str, Any]) -> str:
    layers = report["layers"]
    cfg = report["config"]
    head = (f"converted {len(layers)} FFN(s) to MoE: router={cfg['router']}, experts={cfg['num_experts']}, "
            f"top_k={cfg['top_k']}, init={cfg['init']} ({report['seconds']:.2f}s)")
    rows = [[d["moe"] or "(root)", d["rule"], _shape(d), f"{d['experts']}x{d['expert_size']}", d["capture"]]
            for d in layers]
    out = [head, format_table(["moe layer", "rule", "dense ffn", "experts", "captured by"], rows)]
    v = report.get("verification")
    if v and v.get("compared"):
        verdict = "exact" if v["exact"] else ("NOT exact" if v["exact_expected"] else "differs, as expected")
        out.append(f"check on the example inputs: max relative error {v['relative_error']:.2e} vs dense ({verdict})")
    if report.get("quality"):
        out.append(f"quality on held-out calibration data: {quality_line(report['quality'])}")
    if report.get("not_selected"):
        out.append(f"left dense by the layer selection: {len(report['not_selected'])}")
    out += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(out)


def quality_line(quality: dict[str, Any]) -> str:
    """One line of a conversion's end-to-end figures (an ``Evaluation.to_dict()``)."""
    m = quality["metrics"]
    parts = []
    if "perplexity_ratio" in m:
        parts.append(f"perplexity {m['perplexity_dense']:.3g} -> {m['perplexity_moe']:.3g} (ratio {m['perplexity_ratio']:.3f})")
    if "kl" in m:
        parts.append(f"KL {m['kl']:.3g} nats/token, top-1 agreement {m['top1_agreement']:.1%}")
    if "embedding_cosine" in m:
        parts.append(f"embedding cosine {m['embedding_cosine']:.4f}")
    if "output_cosine" in m and "embedding_cosine" not in m:
        parts.append(f"output cosine {m['output_cosine']:.4f}")
    return ", ".join(parts) + f" on {quality['tokens']} tokens"


def render_report_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = ["# moefx conversion report", ""]
    lines.append(f"Router `{cfg['router']}`, {cfg['num_experts']} experts, top-{cfg['top_k']}, "
                 f"init `{cfg['init']}`, capacity factor {cfg['capacity_factor']}, seed {cfg['seed']}.")
    lines += ["", "| MoE layer | rule | dense FFN | experts | captured by |", "|---|---|---|---|---|"]
    for d in report["layers"]:
        lines.append(f"| `{d['moe'] or '(root)'}` | {d['rule']} | {_shape(d)} | {d['experts']} x {d['expert_size']} "
                     f"| {d['capture']} |")
    v = report.get("verification")
    if v and v.get("compared"):
        lines += ["", f"Max relative error against the dense model on the example inputs: {v['relative_error']:.2e}."]
    if report.get("quality"):
        lines += ["", f"Quality on held-out calibration data: {quality_line(report['quality'])}."]
    if report.get("not_selected"):
        lines += ["", "Left dense by the layer selection: " + ", ".join(f"`{n}`" for n in report["not_selected"])]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    if report.get("near_misses"):
        lines += ["", "## Near-misses", ""]
        lines += [f"- `{m['where']}`: {m['reason']}" for m in report["near_misses"]]
    return "\n".join(lines) + "\n"
