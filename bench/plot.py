"""``plot.png``: inflate throughput per mode and pattern against the kernel limit, and a real
guest's memory over time during a 1 GiB inflate and deflate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

MIB = 1 << 20
COLOURS = {"in-process": "#4c72b0", "thread": "#55a868", "jailed": "#c44e52"}


def write_plot(series: dict, path: Path, machine: str) -> None:
    fig, (bars, memory) = plt.subplots(1, 2, figsize=(14, 5.5))
    _throughput(bars, series.get("throughput", []), series.get("unavailable", {}))
    _trace(memory, series.get("trace"))
    fig.suptitle(f"vballoon benchmarks — {machine}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput(ax, points: list[dict], unavailable: dict[str, str]) -> None:
    groups = []
    for p in points:
        key = (p["pattern"], p["batch"])
        if p["mode"].startswith("kernel") or key in groups:
            continue
        groups.append(key)
    modes = [m for m in COLOURS if any(p["mode"] == m for p in points)]
    width = 0.8 / max(1, len(modes))
    for g, (pattern, batch) in enumerate(groups):
        for i, mode in enumerate(modes):
            value = next((p["gib_s"] for p in points if (p["mode"], p["pattern"], p["batch"])
                          == (mode, pattern, batch)), None)
            if value is None:
                continue
            x = g - 0.4 + width * (i + 0.5)
            ax.bar(x, value, width * 0.9, color=COLOURS[mode], label=mode if g == 0 else None)
            ax.text(x, value, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
        limit = next((p["gib_s"] for p in points if p["mode"] == "kernel"
                      and p["pattern"] == pattern), None)
        if limit is not None:
            ax.hlines(limit, g - 0.45, g + 0.45, colors="black", linestyles="--",
                      label="kernel limit (fallocate per range)" if g == 0 else None)
            ax.text(g + 0.45, limit, f" {limit:.1f}", va="center", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{p}\n{b} buffer{'s' if b > 1 else ''}/kick" for p, b in groups])
    ax.set_ylabel("GiB/s released")
    title = "Inflate throughput, fake driver, 256-PFN buffers"
    if unavailable:
        title += "\n(not run: " + ", ".join(unavailable) + ")"
    ax.set_title(title, fontsize=10)
    if groups:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no throughput measured in this run", ha="center", va="center",
                transform=ax.transAxes)


def _trace(ax, trace: dict | None) -> None:
    if not trace or not trace.get("samples"):
        ax.text(0.5, 0.5, "no real-guest trace in this run", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    t = [s[0] * 1e3 for s in trace["samples"]]
    ax.plot(t, [s[1] / MIB for s in trace["samples"]], label="host RAM behind the guest (MiB)",
            color="#4c72b0", marker=".", markersize=3)
    ax.plot(t, [s[2] / MIB for s in trace["samples"]], label="balloon actual (MiB)",
            color="#c44e52", marker=".", markersize=3)
    ax.step(t, [s[3] / MIB for s in trace["samples"]], where="post", label="balloon target (MiB)",
            color="grey", linestyle=":")
    for name, at in trace.get("marks", {}).items():
        ax.axvline(at * 1e3, color="lightgrey", linewidth=0.8)
    ax.set_xlabel("ms (sampled every ~20 ms)")
    ax.set_ylabel("MiB")
    ax.set_title(f"Real guest: {trace['size'] // MIB} MiB inflate then deflate "
                 f"({trace.get('mode')}, {trace.get('placement')})", fontsize=10)
    ax.legend(fontsize=8)
