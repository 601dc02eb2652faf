"""Results of a scenario's runs: the per-policy table and a self-contained HTML report.

The table is what the README quotes: GPU-hours, peak GPUs, mean SM (tensor) and bandwidth
utilization of the GPUs in use, TTFT/TPOT p50/p99, SLO attainment, goodput per GPU-hour and
the ratio to the fluid lower bound. The HTML embeds its matplotlib plots as base64 PNGs, so
the one file can be mailed or attached to a CI run.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.gap import CAUSES, GAP_HEADERS, gap_rows
from sim.results import RunResult


@dataclass(frozen=True)
class Row:
    policy: str
    gpu_hours: float
    peak_gpus: float
    mean_sm: float
    mean_bw: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    slo: float  # fraction of requests meeting both targets (unfinished = missed)
    goodput: float  # SLO-meeting requests per GPU-hour
    vs_lb: float
    unfinished: int
    requests: int


def _pct(x: np.ndarray, q: float) -> float:
    """Percentile with unfinished requests (NaN) counted as infinitely late."""
    if len(x) == 0:
        return float("nan")
    return float(np.percentile(np.where(np.isnan(x), np.inf, x), q, method="higher"))


def lower_bound_hours(results: Sequence[RunResult]) -> float:
    """The bound the ratios use: the smallest of the runs' bounds (valid for every run)."""
    return min(r.lb_gpu_hours for r in results)


def packing_bound_hours(results: Sequence[RunResult]) -> float:
    """The packing bound (pods whole, GPUs whole; lower_bound.packing_lower_bound), smallest
    over the runs. Shown beside the issue's fluid bound to say how much of a policy's gap to
    the fluid bound no placement could close."""
    return min(r.packing_lb_gpu_hours for r in results)


def rows(results: Sequence[RunResult]) -> list[Row]:
    lb = lower_bound_hours(results)
    out = []
    for r in results:
        req = r.requests
        met = r.slo_met()
        out.append(
            Row(
                policy=r.policy,
                gpu_hours=r.gpu_hours,
                peak_gpus=r.peak_gpus,
                mean_sm=r.mean_sm,
                mean_bw=r.mean_bw,
                ttft_p50=_pct(req.ttft, 50),
                ttft_p99=_pct(req.ttft, 99),
                tpot_p50=_pct(req.tpot, 50),
                tpot_p99=_pct(req.tpot, 99),
                slo=float(met.mean()) if len(met) else 1.0,
                goodput=float(met.sum() / r.gpu_hours) if r.gpu_hours > 0 else 0.0,
                vs_lb=r.gpu_hours / lb if lb > 0 else float("inf"),
                unfinished=int(np.isnan(req.finish).sum()),
                requests=len(req),
            )
        )
    return out


def _ms(x: float) -> str:
    if math.isinf(x):
        return "never"
    if math.isnan(x):
        return "-"
    return f"{x * 1000:.0f}" if x >= 0.1 else f"{x * 1000:.1f}"


HEADERS = (
    "policy",
    "GPU-h",
    "peak GPUs",
    "SM util",
    "BW util",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "TPOT p50 ms",
    "TPOT p99 ms",
    "SLO met",
    "goodput /GPU-h",
    "× lower bound",
)


def table_cells(results: Sequence[RunResult]) -> list[list[str]]:
    lines = []
    for row in rows(results):
        lines.append(
            [
                row.policy,
                f"{row.gpu_hours:.1f}",
                f"{row.peak_gpus:.0f}",
                f"{row.mean_sm:.1%}",
                f"{row.mean_bw:.1%}",
                _ms(row.ttft_p50),
                _ms(row.ttft_p99),
                _ms(row.tpot_p50),
                _ms(row.tpot_p99),
                f"{row.slo:.2%}",
                f"{row.goodput:,.0f}",
                f"{row.vs_lb:.2f}",
            ]
        )
    lb = lower_bound_hours(results)
    peak_lb = max(float(np.max(r.series_lb)) if len(r.series_lb) else 0.0 for r in results)
    lines.append(["fluid lower bound", f"{lb:.1f}", f"{peak_lb:.1f}"] + ["-"] * 8 + ["1.00"])
    plb = packing_bound_hours(results)
    if plb > 0:
        ratio = f"{plb / lb:.2f}" if lb > 0 else "-"
        lines.append(["packing lower bound", f"{plb:.1f}", "-"] + ["-"] * 8 + [ratio])
    return lines


def text_table(headers: Sequence[str], body: list[list[str]]) -> str:
    cells = [list(headers), *body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for j, r in enumerate(cells):
        pairs = enumerate(zip(r, widths, strict=True))
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in pairs))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_text(results: Sequence[RunResult]) -> str:
    """The table, then where each run's GPU-hours above its own fluid bound go."""
    text = text_table(HEADERS, table_cells(results))
    gap = gap_rows(results)
    if gap:
        text += "\n\nGPU-hours above each run's own fluid bound, by cause (sim/gap.py):\n"
        text += text_table(GAP_HEADERS, gap)
    return text


def _rich(headers: Sequence[str], body: list[list[str]], title: str):
    from rich.table import Table

    t = Table(title=title)
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 else "right")
    for cells in body:
        t.add_row(*cells)
    return t


def rich_table(results: Sequence[RunResult], title: str):
    return _rich(HEADERS, table_cells(results), title)


def rich_gap_table(results: Sequence[RunResult]):
    """The gap attribution per policy, GPU-h (share of the excess)."""
    return _rich(GAP_HEADERS, gap_rows(results), "where the GPU-hours above the fluid bound go")


# --- HTML ---------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(results: Sequence[RunResult]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out: list[tuple[str, str]] = []
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in results:
        ax.step(r.series_t / 60, r.series_gpus, where="post", label=r.policy)
    best = min(results, key=lambda r: r.lb_gpu_seconds)
    ax.plot(best.series_t / 60, best.series_lb, "k--", lw=1, label="fluid lower bound")
    ax.set_xlabel("simulated minutes")
    ax.set_ylabel("GPUs in use")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    out.append(("GPUs in use over time", _png(fig)))

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], results, strict=True):
        ok = ~np.isnan(r.gpu_sm)
        ax.scatter(r.gpu_sm[ok], r.gpu_bw[ok], s=10, alpha=0.6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{r.policy} ({int(ok.sum())} GPUs)", fontsize=9)
        ax.set_xlabel("mean SM (tensor) use")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean bandwidth use")
    out.append(("Per-GPU SM vs bandwidth utilization (mean over time in use)", _png(fig)))

    gapped = [r for r in results if r.gap is not None and r.gap.series.shape[1]]
    if gapped:
        n = len(gapped)
        fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False, sharey=True)
        for ax, r in zip(axes[0], gapped, strict=True):
            g = r.gap
            ax.stackplot(
                g.series_t / 60, g.series, labels=("fluid need", *CAUSES), step="post", alpha=0.85
            )
            ax.step(g.series_t / 60, g.series.sum(axis=0), "k", where="post", lw=0.8)
            ax.set_title(f"{r.policy} ({g.excess_s / 3600:.1f} GPU-h above)", fontsize=9)
            ax.set_xlabel("simulated minutes")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("GPUs in use")
        axes[0][0].legend(loc="upper left", fontsize=7)
        out.append(
            ("GPUs in use over the fluid bound, the excess stacked by cause", _png(fig))
        )

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        for ax, x in ((a1, r.requests.ttft), (a2, r.requests.tpot)):
            v = np.sort(x[~np.isnan(x)])
            if len(v) == 0:
                continue
            y = np.arange(1, len(v) + 1) / len(x)
            ax.plot(np.maximum(v, 1e-4) * 1000, y, label=r.policy)
    for ax, name, slo in ((a1, "TTFT", results[0].ttft_slo), (a2, "TPOT", results[0].tpot_slo)):
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        for s in np.unique(slo):
            ax.axvline(s * 1000, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    a1.legend(loc="lower right", fontsize=8)
    out.append(("TTFT and TPOT CDFs (dotted: SLO targets)", _png(fig)))
    return out


def write_html(results: Sequence[RunResult], path: Path, *, title: str, notes: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for cells in table_cells(results)
    )
    if gap_rows(results):
        body_gap = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
            for cells in gap_rows(results)
        )
        head_gap = "".join(f"<th>{html.escape(h)}</th>" for h in GAP_HEADERS)
        gap_table = (
            "<h2>GPU-hours above each run's fluid bound, by cause</h2>"
            f"<table><thead><tr>{head_gap}</tr></thead><tbody>{body_gap}</tbody></table>"
        )
    else:
        gap_table = ""
    figs = "".join(
        f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{b}'/>"
        for t, b in _plots(results)
    )
    detail = "".join(
        f"<li><b>{html.escape(r.policy)}</b>: {len(r.pods)} pods created, "
        f"at most {r.max_pods_per_unit} per unit, peak unit memory "
        f"{r.max_unit_mem_frac:.0%}, {r.unschedulable_attempts} unschedulable attempts, "
        f"extender calls {html.escape(str(r.extender_calls))}, {r.wall_s:.1f} s wall</li>"
        for r in results
    )
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1><p>{html.escape(notes)}</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<ul>{detail}</ul>{gap_table}{figs}</body></html>"""
    path.write_text(doc)
    return path
