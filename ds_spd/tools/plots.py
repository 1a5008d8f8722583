"""PNG plots (matplotlib, headless) of scans and plans."""
from __future__ import annotations

from ds_spd.outputs import PNG_KEY, PNG_VALUE, write_atomic
from ds_spd.plan import Plan

CLASS_COLORS = {"TP": "#9e9e9e", "ISB": "#2e7d32", "SB": "#f9a825", "ESB": "#c62828"}


def plot_plan(plan: Plan, path: str) -> str:
    """Sensitivity per block (coloured by class) and the scan's metric vs number of SPD blocks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scan = plan.scan or {}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    idx = [b.index for b in plan.blocks]
    scanned = [b for b in plan.blocks if b.sensitivity is not None]   # a partial scan (--last N) leaves gaps
    ax1.bar([b.index for b in scanned], [b.sensitivity for b in scanned], color=[CLASS_COLORS[b.cls] for b in scanned])
    if len(scanned) < len(idx):
        ax1.text(0.01, 0.97, f"scanned: last {len(scanned)} of {len(idx)} blocks", transform=ax1.transAxes,
                 va="top", fontsize=8)
    ax1.set(xlabel="block", ylabel=f"sensitivity (delta {scan.get('metric', 'ppl')})",
            title=f"{plan.model}, tp={plan.tp_size}: block sensitivity ({scan.get('method', '?')} scan)")
    ax1.axhline(0, color="black", lw=0.5)
    values = sorted(abs(b.sensitivity) for b in scanned)
    if values and values[-1] > 20 * max(values[len(values) // 2], 1e-12):  # a few outliers: symmetric log scale
        ax1.set_yscale("symlog", linthresh=max(values[len(values) // 2], 1e-6))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in CLASS_COLORS.values()]
    ax1.legend(handles, CLASS_COLORS.keys(), fontsize=8)
    if scan.get("after"):
        n = len(scan["after"])
        ax2.plot(range(n + 1), [scan["baseline"], *scan["after"]], marker="o", ms=3)
        ax2.set(xlabel="SPD blocks (in the scan's order of conversion)", ylabel=scan.get("metric", "ppl"),
                title="metric as blocks are converted")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
    """Save a matplotlib figure as a PNG marked as ds_spd's (so a later run may replace it), atomically."""
    import matplotlib.pyplot as plt
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", metadata={PNG_KEY: PNG_VALUE}))
    plt.close(fig)
    return path


def plot_count_curves(ax, counts: list[int], curves: dict[str, dict], key: str, baseline: float,
                      baseline_label: str = "TP baseline") -> None:
    """One line per variant of a metric (``curves[name][str(n)][key]``) against the number of SPD blocks."""
    for name, curve in curves.items():
        ax.plot(counts, [curve[str(n)][key] for n in counts], marker="o", label=name)
    ax.axhline(baseline, color="gray", ls="--", label=baseline_label)
    ax.set(xlabel="SPD blocks (least sensitive first)", ylabel=f"held-out {key}")
    ax.grid(alpha=0.3)
