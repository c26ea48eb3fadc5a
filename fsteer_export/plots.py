"""PNG plots for reports: gate scores vs threshold, expert usage, refusal trade-off."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def gate_histogram(scores: dict[str, list[float]], threshold: float | None, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, vals in scores.items():
        if vals:
            ax.hist(vals, bins=30, alpha=0.55, label=f"{label} (n={len(vals)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label="gate threshold")
    ax.set_xlabel("gate detection score")
    ax.set_ylabel("prompts")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def expert_usage(usage: list[float], path: Path, title: str = "MoSE expert usage (mean routing weight)") -> Path:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(len(usage)), usage)
    ax.set_xlabel("expert")
    ax.set_ylabel("mean α")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tradeoff(curves: dict[str, list[tuple[float, float, float]]], path: Path) -> Path:
    """curves: method → [(strength, benign refusal, harmful refusal)]."""
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = "sv^DPX*o"
    for i, (method, pts) in enumerate(curves.items()):
        pts = sorted(pts)
        # FineSteer on top and larger: gated methods share points at 0 % over-refusal and would hide it
        main = method == "finesteer"
        ax.plot([p[1] * 100 for p in pts], [p[2] * 100 for p in pts], marker="o" if main else markers[i % len(markers)],
                markersize=9 if main else 5, linewidth=2.5 if main else 1.2, zorder=3 if main else 2,
                markerfacecolor="none" if main else None, label=method)
        for s, x, y in pts:
            ax.annotate(f"{s:g}", (x * 100, y * 100), fontsize=6, alpha=0.7)
    ax.set_xlabel("benign refusal (over-refusal) %")
    ax.set_ylabel("harmful refusal %")
    ax.set_title("Safety vs over-refusal across strengths λ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_plots(report: dict, folder: Path) -> list[Path]:
    out = []
    scores = report.get("gate_scores") or {}
    if scores:
        thr = None
        out.append(gate_histogram({"IR validation": scores.get("val_ir", []),
                                   "general validation": scores.get("val_general", []),
                                   "IR calibration": scores.get("calibration", [])}, thr,
                                  folder / "gate_scores.png", f"SCS scores at layer {report.get('gate_layer')}"))
    usage = (report.get("mose") or {}).get("expert_usage")
    if usage:
        out.append(expert_usage(usage, folder / "expert_usage.png"))
    return out
