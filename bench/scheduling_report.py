"""bench/scheduling.py's report: the table of systems and classes with the checks, and the plot (latency CDFs,
goodput, the SLO controller's limits over time, the tenants' tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.report import markdown_table


def row(result: dict, system: str, cls: str) -> dict | None:
    return next((r for r in result["rows"] if r["system"] == system and r["class"] == cls), None)


COLUMNS = ["system", "class", "requests", "finished", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms",
           "e2e_p50_ms", "goodput", "goodput_rps", "output_tok_s", "preemptions"]


def _shown(r: dict) -> bool:
    """Table rows: the classes of the priority systems, the tenants of ``fair`` (every row is in the JSON)."""
    tenant = r["class"].startswith("tenant")
    return r["class"] == "all" or (tenant if r["system"] == "fair" else not tenant)


def table(result: dict) -> str:
    cal, tg = result["calibration"], result["targets"]
    rows = [r for r in result["rows"] if _shown(r)]
    head = (f"Scheduling at saturation ({result['config']['model_name']}, {result['environment'].get('gpu', 'CPU')}): "
            f"{result['rate_rps']:.2f} req/s = {result['config']['rate_factor']} x capacity "
            f"({cal['capacity_rps']:.2f} req/s) for {result['config']['duration_s']:.0f} s; targets TTFT "
            f"{tg['ttft_ms']:.0f} ms, TPOT {tg['tpot_ms']:.0f} ms; fcfs-cap max_num_seqs {result['fcfs_cap']}\n\n")
    text = head + markdown_table(rows, COLUMNS)
    if result.get("tenants"):
        t = result["tenants"]
        text += (f"\n\nfair, weights a:b = 1:3: tokens served {t['tokens']} over {t['window_s'][0]:.0f}-"
                 f"{t['window_s'][1]:.0f} s, b/a = {t['ratio'] or float('nan'):.2f} (both backlogged at "
                 f"{100 * t['saturated_share']:.0f}% of steps; the run stops with the arrivals)")
    if result["checks"]:
        text += "\n\n" + markdown_table(result["checks"], ["check", "value", "limit", "ok"])
    return text


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    _plot_latency(axes[0], result)
    if "priority+slo" in result["systems"]:
        _plot_limits(axes[1, :2], result)
    if "fair" in result["systems"]:
        _plot_tenants(axes[1, 2], result)
    fig.suptitle(f"{result['benchmark']}: {result['config']['model_name']}, {result['environment'].get('gpu', 'CPU')}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _cdf(ax, values, *args, **kwargs) -> None:
    v = np.sort([x for x in values if x is not None])
    ax.plot(v, np.arange(1, len(v) + 1) / max(len(v), 1), *args, **kwargs)


def _plot_latency(axes, result: dict) -> None:
    """TTFT CDF per class, TPOT CDF, goodput bars: one colour per system."""
    systems = [s for s in result["systems"] if s != "fair"]
    colors = {s: f"C{i}" for i, s in enumerate(result["config"]["systems"])}
    for s in systems:
        req = result["systems"][s]["requests"]
        for cls, style in (("high", "-"), ("low", "--")):
            _cdf(axes[0], [t for t, c in zip(req["ttft_ms"], req["class"]) if c == cls], style, color=colors[s],
                 label=f"{s} {cls}")
        _cdf(axes[1], req["tpot_ms"], color=colors[s], label=s)
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT CDF (solid: high, dashed: low priority)"),
                           (axes[1], "tpot_ms", "TPOT CDF (all requests)")):
        ax.axvline(result["targets"][key], color="k", lw=1, ls=":", label="target")
        ax.set_xscale("log")
        ax.set_xlabel("ms")
        ax.set_title(title)
        ax.legend(fontsize=6)
    classes, width = ("high", "low", "all"), 0.8 / max(len(systems), 1)
    for i, s in enumerate(systems):
        axes[2].bar(np.arange(3) + i * width, [(row(result, s, c) or {}).get("goodput") or 0 for c in classes], width,
                    color=colors[s], label=s)
    axes[2].set_xticks(np.arange(3) + 0.4 - width / 2, classes)
    axes[2].set_title("goodput: share meeting TTFT and TPOT targets")
    axes[2].legend(fontsize=6)


def _plot_limits(axes, result: dict) -> None:
    """priority+slo over time: max_running and occupancy, prefill_budget and step time."""
    s = result["systems"]["priority+slo"]["series"]
    for key in ("max_running", "num_running"):
        axes[0].plot(s["t_s"], s[key], label=key, lw=1)
    axes[0].set_ylim(0, max(s["max_running"] + s["num_running"]) * 1.3)
    waiting = axes[0].twinx()
    waiting.plot(s["t_s"], s["num_waiting"], color="C7", lw=0.8, label="num_waiting (right)")
    waiting.legend(fontsize=6, loc="upper right")
    axes[0].set_title("priority+slo: batch limit and occupancy")
    axes[1].plot(s["t_s"], s["prefill_budget"], color="C3", lw=1, label="prefill_budget (tokens)")
    step = axes[1].twinx()
    step.plot(s["t_s"], s["step_ms"], color="C7", lw=0.5, alpha=0.6, label="step ms (right)")
    step.axhline(result["targets"]["tpot_ms"], color="k", ls=":", lw=1, label="TPOT target")
    step.legend(fontsize=6, loc="upper right")
    axes[1].set_title("priority+slo: prefill budget and step time")
    for ax in axes:
        ax.axvline(result["config"]["duration_s"], color="k", lw=0.8, ls="--")
        ax.set_xlabel("s (dashed: arrivals end)")
        ax.legend(fontsize=6, loc="upper left")


def _plot_tenants(ax, result: dict) -> None:
    series, tenants = result["systems"]["fair"]["series"], result["tenants"]
    for tenant, served in series["served"].items():
        ax.plot(series["t_s"], served, label=f"tenant {tenant} (weight {tenants['weights'][tenant]:g})")
    for x in tenants["window_s"]:
        ax.axvline(x, color="k", lw=0.8, ls=":")
    ax.set_title(f"fair: tokens served (prompt + output), b/a = {tenants['ratio'] or float('nan'):.2f}")
    ax.set_xlabel("s")
    ax.legend(fontsize=6)


# ---- driver -------------------------------------------------------------------------------------------
