"""What the demo writes into its output folder, and how its tables print a metric value."""

from __future__ import annotations

#: What the demo writes into its output folder (``--overwrite`` removes exactly these first).
OUTPUT_ENTRIES = ("data", "full_model", "retain_model", "alternates.jsonl",
                  "alternates.jsonl.settings.json", "unlearned_model", "unlearned_models",
                  "eval", "demo_summary.json", "demo_plot.png", "demo_compare.png")
SUMMARY_NAME = "demo_summary.json"
PLOT_NAME = "demo_plot.png"
COMPARE_PLOT_NAME = "demo_compare.png"  # --compare: the methods' TOFU metrics side by side


def format_metric(value) -> str:
    """A metric for the demo's tables: ``-`` when missing, 4 decimals, tiny values in e-notation."""
    if value is None:
        return "-"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4f}"
