"""The pipeline's report: the stage table side by side with the dense model, as text, Markdown,
JSON and a self-contained HTML page with plots.

The HTML embeds its plots as PNG data URIs and its styles inline: it opens in a browser with no
network access. Plots need matplotlib (``pip install 'prunekit[report]'``); without it the page
holds the tables and says that the plots were left out.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from prunekit.compress.durable import write_text_atomic

NOISY_SPREAD = 0.10
"""A latency is marked noisy (``~`` in the table, and a note) when the interquartile range of
the model's or the dense model's repeated calls exceeds this fraction of their median (about a
7 % coefficient of variation for normal noise): the medians, and so their ratio, may be off."""


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def table_rows(report: Any) -> list[dict[str, Any]]:
    """Dense first, then one dict per stage, with ratios against dense."""
    dense = report.dense
    rows = [{"stage": "dense", "seconds": None, "resumed": False, **_ratios(dense, dense, report)}]
    for stage in report.stages:
        if not stage.metrics:
            rows.append({"stage": stage.label, "seconds": stage.seconds, "resumed": stage.resumed})
            continue
        rows.append(
            {
                "stage": stage.label,
                "seconds": stage.seconds,
                "resumed": stage.resumed,
                **_ratios(stage.metrics, dense, report),
            }
        )
    return rows


def _ratios(m: dict[str, Any], dense: dict[str, Any], report: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "params": m.get("params"),
        "nonzeros": m.get("nonzeros"),
        "nonzero_fraction": m["nonzeros"] / dense["nonzeros"] if dense.get("nonzeros") else None,
        "macs": m.get("macs"),
        "mac_fraction": m["macs"] / dense["macs"] if m.get("macs") and dense.get("macs") else None,
        "file_bytes": m.get("file_bytes"),
        "file_fraction": m["file_bytes"] / dense["fp32_bytes"] if "file_bytes" in m else None,
        "quality": m.get("quality"),
    }
    if "quality" in m and dense.get("quality") not in (None, 0):
        row["quality_retained"] = m["quality"] / dense["quality"]
        row["quality_change"] = m["quality"] - dense["quality"]
    for batch, lat in (m.get("latency") or {}).items():
        row[f"latency_b{batch}_ms"] = lat["ms"]
        row[f"latency_b{batch}_ratio"] = lat["ratio"]
        spreads = [lat[k] for k in ("spread", "dense_spread") if lat.get(k) is not None]
        if spreads:  # not in checkpoints written before the spread was recorded
            row[f"latency_b{batch}_spread"] = max(spreads)
        if lat.get("retimed"):  # a search trial's verdict re-timed it (recipes.goal)
            row[f"latency_b{batch}_retimed"] = lat["retimed"]
        if lat.get("accelerated"):  # timed after prunekit.accelerate (recipes.served)
            row[f"latency_b{batch}_accelerated"] = lat["accelerated"]
        if lat.get("served_as_is"):  # accelerate could not run: timed as it is, and why
            row[f"latency_b{batch}_served_as_is"] = lat["served_as_is"]
    return row


def accelerated_note(report: Any) -> str | None:
    """A line saying which latencies were timed after ``prunekit.accelerate`` (marked ``*``)
    and how many layers it swapped; None when none was."""
    found, as_is = [], []
    for row in table_rows(report):
        for key, value in row.items():
            if key.startswith("latency_b") and key.endswith("_accelerated"):
                batch = key[len("latency_b") : -len("_accelerated")]
                found.append(f"{row['stage']} b{batch} {value['swapped']}/{value['layers']}")
            elif key.startswith("latency_b") and key.endswith("_served_as_is"):
                batch = key[len("latency_b") : -len("_served_as_is")]
                as_is.append(f"{row['stage']} b{batch} ({value})")
    lines = []
    if found:
        lines.append(
            "latency timed as served, after prunekit.accelerate at that batch (sparse kernels "
            "where they are faster here, * where any; layers swapped: " + ", ".join(found) + "); "
            "the saved model is not accelerated: call prunekit.accelerate on it to serve it"
        )
    if as_is:
        lines.append("latency timed without accelerate, as it is: " + "; ".join(as_is))
    return "\n".join(lines) or None


def retime_note(report: Any) -> str | None:
    """A line naming every latency of the stage table that the goal search re-timed beside the
    dense model before its verdict counted, with the timings and why; None when none was."""
    from prunekit.recipes.goal import retimed_timings

    found = []
    for row in table_rows(report):
        for key, retimed in row.items():
            if not (key.startswith("latency_b") and key.endswith("_retimed")):
                continue
            batch = key[len("latency_b") : -len("_retimed")]
            timings = retimed_timings(retimed)
            timings = f"{timings}; " if timings else ""
            found.append(
                f"{row['stage']} b{batch} {row[f'latency_b{batch}_ratio']:.2f}x "
                f"({timings}{retimed.get('reason', '')})"
            )
    if not found:
        return None
    return "latency re-timed beside dense before the goal's verdict: " + "; ".join(found)


def _noisy(spread: float | None) -> bool:
    return spread is not None and not spread <= NOISY_SPREAD  # NaN / inf count as noisy


def noise_note(report: Any) -> str | None:
    """A line naming every noisy latency of the stage table (see :data:`NOISY_SPREAD`), or
    None when every one was steady enough or none was measured."""
    found = []
    for row in table_rows(report):
        for key, spread in row.items():
            if key.startswith("latency_b") and key.endswith("_spread") and _noisy(spread):
                batch = key[len("latency_b") : -len("_spread")]
                found.append(f"{row['stage']} b{batch}: {spread:.0%}")
    if not found:
        return None
    return (
        f"latency ~: noisy timing, the interquartile range of the repeated calls is over "
        f"{NOISY_SPREAD:.0%} of their median ({'; '.join(found)}); the medians and their ratio "
        "may be off: measure again on an idle machine"
    )


def _columns(report: Any) -> list[tuple[str, str]]:
    batches = []
    for stage in report.stages:
        batches = list((stage.metrics.get("latency") or {}).keys()) or batches
    cols = [
        ("stage", "stage"),
        ("params", "params"),
        ("nonzeros", "non-zeros"),
        ("macs", "MACs"),
        ("file", "file (of fp32)"),
    ]
    cols += [(f"lat{b}", f"latency b{b} (x dense)") for b in batches]
    cols += [("quality", report.quality_name), ("time", "time")]
    return cols


def _cells(row: dict[str, Any], report: Any) -> dict[str, str]:
    def pct(x: float | None) -> str:
        return f"{100 * x:.1f}%" if x is not None else "-"

    cells = {
        "stage": row["stage"] + (" (resumed)" if row.get("resumed") else ""),
        "params": _fmt_int(row.get("params")),
        "nonzeros": f"{_fmt_int(row.get('nonzeros'))} ({pct(row.get('nonzero_fraction'))})"
        if row.get("nonzeros") is not None
        else "-",
        "macs": f"{_fmt_int(row.get('macs'))} ({pct(row.get('mac_fraction'))})"
        if row.get("macs")
        else "-",
        "file": f"{_fmt_bytes(row.get('file_bytes'))} ({pct(row.get('file_fraction'))})"
        if row.get("file_bytes") is not None
        else "-",
        "time": f"{row['seconds']:.1f} s" if row.get("seconds") is not None else "-",
    }
    quality = row.get("quality")
    if quality is None:
        cells["quality"] = "-"
    elif row["stage"] == "dense" or "quality_retained" not in row:
        cells["quality"] = f"{quality:.4g}"
    else:
        cells["quality"] = f"{quality:.4g} ({100 * row['quality_retained']:.1f}%)"
    for key in row:
        if key.startswith("latency_b") and key.endswith("_ms"):
            batch = key[len("latency_b") : -len("_ms")]
            ratio = row.get(f"latency_b{batch}_ratio")
            mark = "~" if _noisy(row.get(f"latency_b{batch}_spread")) else ""
            swapped = (row.get(f"latency_b{batch}_accelerated") or {}).get("swapped")
            served = "*" if swapped else ""  # sparse kernels in the timed model
            cells[f"lat{batch}"] = f"{mark}{row[key]:.2f} ms ({ratio:.2f}x{served})"
    return cells


def text_table(report: Any) -> str:
    cols = _columns(report)
    rows = [_cells(r, report) for r in table_rows(report)]
    header = [title for _, title in cols]
    body = [[r.get(key, "-") for key, _ in cols] for r in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *body, strict=False)]

    def line(items: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(items, widths, strict=True))
        )

    title = f"prunekit compress: {report.recipe.name or report.recipe.source}"
    rule = "  ".join("-" * w for w in widths)
    notes = [
        f"file: bytes as saved (compressed weights + config.json / prunekit.json; tokenizer and "
        f"other side files not counted) / the dense fp32 safetensors file "
        f"({_fmt_bytes(report.dense.get('fp32_bytes'))})",
    ]
    if any(k.startswith("lat") for k, _ in cols):
        threads = report.settings.get("torch_threads")
        notes.append(
            f"latency: median, dense timed in the same call, {threads} "
            f"thread{'' if threads == 1 else 's'}"
        )
    for note in (accelerated_note(report), noise_note(report), retime_note(report)):
        if note:
            notes.append(note)
    return "\n".join(
        [title, line(header), rule, *(line(b) for b in body), rule, *notes, *goal_lines(report)]
    )


def goal_lines(report: Any) -> list[str]:
    """The goal's verdict and every search trial, as plain lines (empty without a goal)."""
    lines: list[str] = []
    search = getattr(report, "search", None)
    if search is not None:
        lines += search.lines()
    checks = getattr(report, "goal", None)
    if checks is not None:
        from prunekit.recipes.goal import verdict

        lines.append(verdict(checks))
    return lines


def markdown(report: Any) -> str:
    cols = _columns(report)
    rows = [_cells(r, report) for r in table_rows(report)]
    out = [f"# prunekit compress: {report.recipe.name or report.recipe.source}", ""]
    if report.recipe.description:
        out += [report.recipe.description.strip(), ""]
    out += ["| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r.get(k, "-") for k, _ in cols) + " |" for r in rows]
    for note in (accelerated_note(report), noise_note(report), retime_note(report)):
        if note:
            out += ["", note]
    goal = goal_lines(report)
    if goal:
        out += ["", "## Goal", "", "```", *goal, "```"]
    out += ["", "## Recipe", "", "```json", json.dumps(report.recipe.to_dict(), indent=2), "```"]
    out += ["", "## Stages", ""]
    for stage in report.stages:
        out += [f"### {stage.label}", "", "```", stage.summary.strip() or "(no report)", "```", ""]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plots(report: Any) -> dict[str, str]:
    """Base64 PNGs: per-layer density / width by stage, and size and latency against quality."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return {}
    out: dict[str, str] = {}
    dense_layers = {r["name"]: r for r in report.dense.get("layers", [])}
    measured = [s for s in report.stages if s.metrics.get("layers")]
    if dense_layers and measured:
        names = list(dense_layers)
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 3.8))
        width = 0.8 / len(measured)
        for k, stage in enumerate(measured):
            layers = {r["name"]: r for r in stage.metrics["layers"]}
            values = [
                layers[n]["nonzeros"] / dense_layers[n]["params"] if n in layers else 0.0
                for n in names
            ]
            ax.bar([i + k * width for i in range(len(names))], values, width, label=stage.label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
        ax.set_ylabel("non-zeros / dense weights")
        ax.set_ylim(0, 1.05)
        ax.set_title("per-layer density after each stage (width cuts and zeros)")
        ax.legend(fontsize=7)
        out["layers"] = _png(fig)
    rows = [r for r in table_rows(report) if r.get("file_fraction") is not None]
    if rows and any(r.get("quality") is not None for r in rows):
        keys = [("file_fraction", "file size / dense fp32")]
        lat = sorted(k for k in rows[-1] if k.endswith("_ratio") and k.startswith("latency"))
        keys += [
            (k, k.replace("_ratio", "").replace("latency_b", "latency / dense, batch "))
            for k in lat
        ]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
        for ax, (key, label) in zip(axes[0], keys, strict=True):
            pts = [
                (
                    1.0 if r["stage"] == "dense" and key != "file_fraction" else r.get(key),
                    r.get("quality"),
                    r["stage"],
                )
                for r in rows
            ]  # the dense model is the reference: latency ratio 1 by definition
            pts = [p for p in pts if p[0] is not None and p[1] is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue")
            for x, y, text in label_points(ax, [(x, y, _stage_number(n)) for x, y, n in pts]):
                ax.annotate(text, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
            ax.set_xlabel(label)
            ax.set_ylabel(report.quality_name)
            ax.grid(alpha=0.3)
        key = [Line2D([], [], linestyle="none") for _ in rows]
        names = [
            f"{_stage_number(r['stage'])} {r['stage'].partition('-')[2] or r['stage']}"
            for r in rows
        ]
        fig.legend(
            key, names, loc="lower center", ncol=min(len(rows), 6), fontsize=8,
            handlelength=0, handletextpad=0, frameon=False, bbox_to_anchor=(0.5, -0.02),
        )  # fmt: skip
        fig.suptitle("quality against size and latency, stage by stage", fontsize=10)
        fig.tight_layout(rect=(0, 0.06 * (1 + (len(rows) - 1) // 6), 1, 1))
        out["tradeoff"] = _png(fig)
    search = getattr(report, "search", None)
    if search is not None and search.trials:
        out["search"] = _search_plot(plt, search)
    return out


def _stage_number(stage: str) -> int:
    """0 for the dense row, else the stage's number (``03-finetune`` -> 3)."""
    head = stage.partition("-")[0]
    return int(head) if head.isdigit() else 0


def label_points(
    ax: Any, points: list[tuple[float, float, int]], near: float = 0.08
) -> list[tuple[float, float, str]]:
    """One label per cluster of points that would overlap: points closer than ``near`` (a
    fraction of the axes, after autoscaling) to a labelled one join its label, which lists
    their numbers (``2-5``, ``1,3``). Returns (x, y, text) to annotate.

    Example:
        >>> import matplotlib.pyplot as plt
        >>> _, ax = plt.subplots()
        >>> _ = ax.plot([0, 1, 1.001], [0, 1, 1], "o")
        >>> label_points(ax, [(0, 0, 0), (1, 1, 1), (1.001, 1, 2)])
        [(0, 0, '0'), (1, 1, '1-2')]
    """
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    sx, sy = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    groups: list[tuple[float, float, list[int]]] = []
    for x, y, number in points:
        for gx, gy, members in groups:
            if abs(x - gx) / sx < near and abs(y - gy) / sy < near:
                members.append(number)
                break
        else:
            groups.append((x, y, [number]))
    return [(x, y, _number_ranges(members)) for x, y, members in groups]


def _number_ranges(numbers: list[int]) -> str:
    """``[2, 3, 4, 6]`` -> ``2-4,6``."""
    parts: list[str] = []
    ordered = sorted(set(numbers))
    start = prev = ordered[0]
    for n in [*ordered[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(parts)


def _search_plot(plt: Any, search: Any) -> str:
    """Each goal figure measured at every trial against the searched value, with its bound."""
    names = list(dict.fromkeys(c.name for t in search.trials for c in t.checks))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        pts = sorted(
            (t.value, c.measured, c.met, t is search.chosen)
            for t in search.trials
            for c in t.checks
            if c.name == name and c.measured is not None
        )
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="0.7", zorder=1)
        for value, measured, met, chosen in pts:
            ax.scatter(
                value,
                measured,
                marker="*" if chosen else "o",
                s=140 if chosen else 36,
                color="tab:green" if met else "tab:red",
                zorder=2,
            )
        target = next(c.target for t in search.trials for c in t.checks if c.name == name)
        ax.axhline(target, color="0.3", linestyle="--", linewidth=1)
        ax.set_xlabel(f"{search.knob.verb}.{search.knob.key}")
        ax.set_ylabel(name if name == "quality" else f"{name} / dense")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "search: every trial (green met, red missed, star chosen; dashed: goal)", fontsize=10
    )
    return _png(fig)


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:14px;margin:1em 0}
th,td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
tr:first-child td{background:#f3f6fa}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.note{color:#666;font-size:13px}
"""


def html_page(report: Any, images: dict[str, str]) -> str:
    cols = _columns(report)
    rows = [_cells(r, report) for r in table_rows(report)]
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>prunekit compress: {esc(report.recipe.name or report.recipe.source)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>prunekit compress: {esc(report.recipe.name or report.recipe.source)}</h1>",
    ]
    if report.recipe.description:
        parts.append(f"<p>{esc(report.recipe.description)}</p>")
    parts.append("<table><tr>" + "".join(f"<th>{esc(t)}</th>" for _, t in cols) + "</tr>")
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(r.get(k, '-'))}</td>" for k, _ in cols) + "</tr>")
    parts.append("</table>")
    parts.append(
        "<p class='note'>file: bytes as saved (compressed) against the dense model's fp32 "
        "safetensors file; latency: median, the dense model timed in the same call; quality in "
        "brackets: retained fraction of dense.</p>"
    )
    accelerated = accelerated_note(report)
    if accelerated:
        parts.append(f"<p class='note'>{esc(accelerated)}</p>")
    noise = noise_note(report)
    if noise:
        parts.append(f"<p class='note'><b>{esc(noise)}</b></p>")
    retimed = retime_note(report)
    if retimed:
        parts.append(f"<p class='note'>{esc(retimed)}</p>")
    goal = goal_lines(report)
    if goal:
        parts.append("<h2>Goal</h2><pre>" + esc("\n".join(goal)) + "</pre>")
    if images:
        for key, title in (
            ("search", "Search for the goal"),
            ("layers", "Per-layer density"),
            ("tradeoff", "Size, latency, quality"),
        ):
            if key in images:
                parts.append(f"<h2>{title}</h2>")
                parts.append(f"<img alt='{esc(title)}' src='data:image/png;base64,{images[key]}'>")
    else:
        parts.append(
            "<p class='note'>Plots left out: matplotlib is not installed "
            "(pip install 'prunekit[report]').</p>"
        )
    parts.append(
        "<h2>Recipe</h2><pre>" + esc(json.dumps(report.recipe.to_dict(), indent=2)) + "</pre>"
    )
    for stage in report.stages:
        parts.append(f"<h3>{esc(stage.label)}</h3><pre>{esc(stage.summary.strip() or '-')}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: Any, out: str | os.PathLike) -> dict[str, str]:
    """Write report.json, report.md and report.html into ``out``; return their paths."""
    out = Path(out)
    files = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    data = report.to_dict()
    data["table"] = table_rows(report)
    write_text_atomic(files["json"], json.dumps(data, indent=1, default=str) + "\n")
    write_text_atomic(files["md"], markdown(report))
    write_text_atomic(files["html"], html_page(report, plots(report)))
    return {k: str(v) for k, v in files.items()}
