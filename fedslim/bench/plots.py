"""Plots for the communication benchmark: frontier (bytes reduction vs accuracy) and
curves (accuracy vs cumulative bytes). Points carry numbers and a legend below the axes, so
labels never overlap or get cut; every title says which seeds it shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKERS = "os^vD<>ph*Xd"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt: Any, fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str,
            title: str) -> None:
    """Log x axis, labels, a legend below the axes (never over the points), save."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def frontier(summary: list[dict[str, Any]], path: Path, ratio_key: str, xlabel: str,
             title: str, selected_key: str) -> None:
    """Mean test accuracy vs mean ``ratio_key`` per setting (log x)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 6.5))
    for i, s in enumerate(summary):
        if ratio_key not in s:  # no baseline run for this setting's seeds
            continue
        chosen = s.get(selected_key, False)
        ax.errorbar(s[ratio_key], 100 * s["test"], yerr=100 * s["test_sd"], fmt="none",
                    ecolor="0.7", zorder=2)
        ax.scatter(s[ratio_key], 100 * s["test"], s=110 if chosen else 45,
                   marker="*" if chosen else MARKERS[i % len(MARKERS)], zorder=3,
                   label=f"{i + 1}. {s['setting']}" + ("  (selected on val)" if chosen else ""))
        ax.annotate(str(i + 1), (s[ratio_key], 100 * s["test"]), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
    _finish(plt, fig, ax, path, xlabel, "final central test accuracy (%), mean ± sd over seeds",
            title)


def curves(rows: list[dict[str, Any]], seed: int, path: Path, bytes_key: str, xlabel: str,
           title: str) -> None:
    """Accuracy vs cumulative bytes for every setting of one seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 6.5))
    for r in rows:
        if r["seed"] != seed:
            continue
        xs = [c[bytes_key] / 1e6 for c in r["curve"]]
        ax.plot(xs, [100 * c["test_accuracy"] for c in r["curve"]], label=r["setting"],
                lw=1.2)
    _finish(plt, fig, ax, path, xlabel, "central test accuracy (%)", title)


def suite_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per strategy: validation accuracy vs cumulative total traffic (log x),
    one colour per setting, one line per seed."""
    plt = _pyplot()
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(strategies), figsize=(5.5 * len(strategies), 5),
                             squeeze=False, sharey=True)
    for ax, strategy in zip(axes[0], strategies, strict=True):
        for i, setting in enumerate(settings):
            first = True
            for r in rows:
                if r["strategy"] != strategy or r["setting"] != setting:
                    continue
                ax.plot([c["total_bytes"] / 1e6 for c in r["curve"]],
                        [100 * c["val_accuracy"] for c in r["curve"]], color=f"C{i}", lw=1,
                        alpha=0.8, label=setting if first else None)
                first = False
        ax.set_xscale("log")
        ax.set_xlabel("cumulative traffic, both directions (MB)")
        ax.set_title(strategy, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("central validation accuracy (%)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
