"""The demo's unlearning methods: each method's recipe, and ``--compare`` (several methods from
the same full model, their TOFU metrics side by side in one table and one figure).

The recipes are the demo's, not open-unlearning's: the tiny models learn in a few hundred
steps at a learning rate a real 1B model would not survive. Each was chosen on the default preset
(seed 0) so that the method meets the demo's forgetting goal (forget_Q_A_Prob at most half,
retain_Q_A_Prob within 10 %); see docs/demo.md for the numbers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from altpo.demo.errors import DemoError
from altpo.demo.layout import COMPARE_PLOT_NAME, OUTPUT_ENTRIES, SUMMARY_NAME, format_metric as _fmt
from altpo.train.method_settings import builtin_methods

REGISTRY = builtin_methods()  # the records, read without torch: `demo --help` lists them

#: What ``altpo-fast demo --compare`` runs.
COMPARE_METHODS = ("altpo", "npo", "simnpo")

# Per method: learning rate, epochs over the forget rows (pairs for altpo/dpo), batch size and
# the method's hyper-parameters. altpo's come from DemoConfig (altpo_lr, altpo_epochs, ...).
_RECIPES = {
    "dpo": dict(lr=2e-3, epochs=10.0, batch_size=8, beta=0.5, alpha=2.0, gamma=1.0),
    "idkdpo": dict(lr=2e-3, epochs=40.0, batch_size=8, beta=0.5, alpha=2.0, gamma=1.0),
    "npo": dict(lr=2e-3, epochs=40.0, batch_size=8, beta=0.5, alpha=2.0, gamma=1.0),
    "simnpo": dict(lr=2e-3, epochs=40.0, batch_size=8, beta=1.0, delta=0.0, alpha=2.0, gamma=1.0),
    "graddiff": dict(lr=1e-3, epochs=20.0, batch_size=8, alpha=2.0, gamma=1.0),
    "gradascent": dict(lr=2e-4, epochs=5.0, batch_size=8, gamma=1.0),
}

# A few refusals written beside the synthetic data for idkdpo (the project's own wording).
IDK_ANSWERS = ("I don't know.", "I am not sure about that.", "I have no information on that.",
               "I can't say.", "That is something I don't know.", "I'm afraid I can't answer that.")


def check_methods(methods: Sequence[str]) -> list[str]:
    for m in methods:
        if m not in REGISTRY:
            raise DemoError(f"unknown method {m!r}; methods: {', '.join(REGISTRY)}")
    if len(set(methods)) != len(methods):
        raise DemoError(f"a method is listed twice: {', '.join(methods)}")
    return list(methods)


def needs_alternates(method: str) -> bool:
    return REGISTRY[method].chosen == "alternates"


def method_title(method: str) -> str:
    return REGISTRY[method].title if method in REGISTRY else method


def demo_recipe(config, method: str) -> dict:
    """The TrainConfig settings of ``method`` in the demo."""
    if method == "altpo":
        return dict(lr=config.altpo_lr, epochs=config.altpo_epochs, batch_size=config.altpo_batch_size,
                    beta=config.beta, alpha=config.alpha, gamma=config.gamma)
    return dict(_RECIPES[method])


def write_idk_answers(data_dir: Path) -> None:
    (Path(data_dir) / "idontknow.jsonl").write_text("\n".join(IDK_ANSWERS) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# --compare: summary, table, figure

COMPARE_METRICS = ("forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
                   "forget_truth_ratio", "retain_Q_A_Prob", "retain_Q_A_ROUGE",
                   "extraction_strength", "privleak")


def _torch_threads() -> int:
    import torch  # loaded by then: the runs it summarises trained with it

    return torch.get_num_threads()


def compare_summary(common: dict, runs: dict, seconds: dict, started: float) -> dict:
    return {**common, "methods": list(runs), "runs": runs,
            "forgetting": {"held": all(r["forgetting"]["held"] for r in runs.values()),
                           **{m: r["forgetting"]["held"] for m, r in runs.items()}},
            "timings_s": seconds, "total_time_s": round(time.perf_counter() - started, 2),
            "torch_threads": _torch_threads(),
            "files": {name: name for name in OUTPUT_ENTRIES if name not in ("unlearned_model",
                                                                             "demo_plot.png")}}


def format_compare_report(summary: dict, out: Path | None = None) -> str:
    """One row per metric, one column per model: before, each method, the retain model."""
    methods = summary["methods"]
    head = ["metric", "before"] + [method_title(m) for m in methods] + ["retain model"]
    rows = [head]
    for name in COMPARE_METRICS:
        rows.append([name, _fmt(summary["before"].get(name))]
                    + [_fmt(summary["runs"][m]["after"].get(name)) for m in methods]
                    + [_fmt(summary["retain_model"].get(name))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for m in methods:
        c = summary["runs"][m]["forgetting"]
        lines.append(f"{method_title(m):>8}: forget_Q_A_Prob {c['forget_Q_A_Prob_before']:.4f} -> "
                     f"{c['forget_Q_A_Prob_after']:.4f} (x{c['forget_ratio']:.2f}), retain_Q_A_Prob "
                     f"{100 * c['retain_relative_change']:+.1f}%: forgetting "
                     f"{'HELD' if c['held'] else 'DID NOT HOLD'}")
    lines.append(f"Total time {summary['total_time_s']:.0f} s.")
    if out is not None:
        lines.append(f"wrote {out / SUMMARY_NAME} and {out / COMPARE_PLOT_NAME}")
    return "\n".join(lines)


def plot_compare(summary: dict, path: Path) -> None:
    """One figure: the TOFU metrics of each model as grouped bars, forget quality on a log axis,
    and forget_Q_A_Prob during each method's training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    models = [("before", "before (full model)", summary["before"])]
    models += [(m, method_title(m), summary["runs"][m]["after"]) for m in methods]
    models.append(("retain_model", "retain model", summary["retain_model"]))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [3, 1.2, 1.6]})

    ax = axes[0]
    names = ["model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio",
             "retain_Q_A_Prob", "extraction_strength"]
    width = 0.8 / len(models)
    for k, (_, label, values) in enumerate(models):
        ax.bar([i + (k - (len(models) - 1) / 2) * width for i in range(len(names))],
               [values.get(n) or 0.0 for n in names], width, label=label)
    ax.set_xticks(range(len(names)), [n.replace("_Q_A_", "\n").replace("_", "\n", 1) for n in names])
    ax.set(title="TOFU metrics", ylim=(0, 1.05))
    ax.legend(fontsize=8)

    ax = axes[1]
    labels = [label for key, label, _ in models if key != "retain_model"]
    fq = [max(values.get("forget_quality") or 1e-30, 1e-30) for key, _, values in models
          if key != "retain_model"]
    ax.bar(range(len(fq)), fq, color=[f"C{k}" for k in range(len(fq))])
    ax.set_yscale("log")
    ax.set_xticks(range(len(fq)), labels, rotation=30, ha="right")
    ax.set(title="forget quality (KS p-value, higher is better)")

    ax = axes[2]
    for k, m in enumerate(methods, 1):
        probs = summary["runs"][m]["probabilities"]
        last = max(p["step"] for p in probs) or 1
        ax.plot([p["step"] / last for p in probs], [p["forget_Q_A_Prob"] for p in probs], "o-",
                color=f"C{k}", label=f"{method_title(m)} forget")
        ax.plot([p["step"] / last for p in probs], [p["retain_Q_A_Prob"] for p in probs], "s--",
                color=f"C{k}", alpha=0.6, label=f"{method_title(m)} retain")
    ax.set(title="Q_A_Prob during training", xlabel="fraction of training", ylim=(0, 1.05))
    ax.legend(fontsize=7)

    fig.suptitle("altpo-fast demo --compare: " + ", ".join(method_title(m) for m in methods)
                 + " from the same full model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
