"""The quality-vs-budget figure: accuracy and KL divergence per policy (needs the eval extra)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_summary(summary: list[dict], full_accuracy: float, path: str, title: str) -> None:
    """Write a PNG: accuracy (left) and mean KL vs the full cache (right) against budget."""
    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in sorted({row["policy"] for row in summary}):
        rows = sorted((r for r in summary if r["policy"] == name and "accuracy" in r),  # not all errors
                      key=lambda r: r["budget"])
        budgets = [r["budget"] for r in rows]
        style = "--" if name.startswith("kvpress:") else "-"
        acc_ax.plot(budgets, [r["accuracy"] for r in rows], style, marker="o", label=name)
        if all(r.get("kl") is not None for r in rows):
            kl_ax.plot(budgets, [r["kl"] for r in rows], style, marker="o", label=name)
    acc_ax.axhline(full_accuracy, color="black", linestyle=":", label="full cache")
    acc_ax.set(xscale="log", xlabel="budget (kept fraction of the prompt's KV)", ylabel="task accuracy",
               ylim=(-0.03, 1.03), title="accuracy")
    kl_ax.set(xscale="log", ylim=(0, None), xlabel="budget (kept fraction of the prompt's KV)",
              ylabel="mean KL(full || policy), nats", title="KL vs full cache")
    budgets = sorted({row["budget"] for row in summary})
    for ax in (acc_ax, kl_ax):
        ax.grid(alpha=0.3)
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
    acc_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
