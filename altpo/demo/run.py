"""The offline end-to-end demo: make data, make a model that knows it, unlearn part of it, measure.

    from altpo.demo import run_demo
    summary = run_demo("altpo-demo")          # or run_demo(dir, preset="small")

Everything runs on the CPU without the hub, in a few minutes on two cores:

1. invent a fictitious-author data set in the TOFU layout (:mod:`altpo.data.synthetic_authors`);
2. train a byte-level BPE tokenizer and a tiny Llama on all of it (the "full" model, the stand-in
   for a TOFU-finetuned checkpoint), and a twin on the retain part only (the "retain" model).
   Both also learn the general-knowledge splits (what a real model knows from pre-training) and,
   on some retain authors, to answer generate-alternates' changed-facts request (what a real
   instruct model can do already);
3. evaluate the retain model, whose logs give forget quality and privleak, and the full model;
4. sample alternate answers for the forget questions from the full model;
5. run AltPO through :func:`altpo.train.train`, the code path of ``altpo-fast train``;
6. evaluate the unlearned model and check that it forgot: forget_Q_A_Prob at most half of its
   starting value, retain_Q_A_Prob within 10 % (relative) of its starting value;
7. write ``demo_summary.json`` and ``demo_plot.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from altpo_kernels.methods import DEFAULT_METHOD

from altpo.data.synthetic_authors import build_synthetic_tofu
from altpo.data.tofu import chat_prompt_text, load_tofu_split
from altpo.demo.errors import DemoError
from altpo.demo.layout import COMPARE_PLOT_NAME, OUTPUT_ENTRIES, PLOT_NAME, SUMMARY_NAME  # noqa: F401
from altpo.demo.layout import format_metric as _fmt
from altpo.demo.methods import (check_methods, compare_summary, demo_recipe, format_compare_report,
                                method_title, needs_alternates, plot_compare, write_idk_answers)
from altpo.eval.alternates import ALTERNATE_PROMPT, generate_alternates
from altpo.eval.tofu import answer_probabilities, evaluate_tofu
from altpo.model.tiny_finetune import finetune_qa
from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer, save_tiny_model
from altpo.train.checkpoint import CHECKPOINTS, list_checkpoints
from altpo.train.config import TrainConfig
from altpo.train.loop import train

# The two conditions the demo must meet (docs/design.md: the demo must really forget).
FORGET_RATIO_LIMIT = 0.5
RETAIN_RELATIVE_TOLERANCE = 0.10

HEADLINE = ("forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
            "forget_truth_ratio", "retain_Q_A_Prob", "retain_Q_A_ROUGE", "privleak",
            "extraction_strength")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and recipes of one demo run. The presets in :data:`PRESETS` are tuned to forget
    reliably on two CPU cores; other values are for experiments."""

    # data
    num_authors: int = 40
    questions_per_author: int = 8
    forget_percent: int = 10
    num_real_authors: int = 20
    num_world_facts: int = 20
    # tokenizer and model
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    # fine-tuning (the full model and its retain twin)
    finetune_epochs: int = 40
    finetune_batch_size: int = 16
    finetune_lr: float = 3e-3
    general_repeats: int = 3
    skill_every_nth_author: int = 2
    # alternates
    num_alternates: int = 5
    max_new_tokens: int = 64
    # AltPO (the settings of altpo-fast train that differ from its defaults)
    altpo_lr: float = 2e-3
    altpo_epochs: float = 10.0
    altpo_batch_size: int = 8
    beta: float = 0.5
    alpha: float = 2.0
    gamma: float = 1.0

    @property
    def forget_split(self) -> str:
        return f"forget{self.forget_percent:02d}"

    @property
    def retain_split(self) -> str:
        return f"retain{100 - self.forget_percent:02d}"


PRESETS = {
    "default": DemoConfig(),
    # for CI and quick looks: half the authors, the same recipe
    "small": DemoConfig(num_authors=20, num_real_authors=10, num_world_facts=10),
}


# ------------------------------------------------------------------------------------------------
# output folder


def prepare_output(output: str | Path, force: bool) -> Path:
    """Check (and with ``force`` clear the demo's own entries of) the output folder."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise DemoError(f"output {out} exists and is not a folder; choose another --output")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DemoError(f"output folder {out} exists and is not empty; pass --overwrite to replace "
                            "the demo's files in it, or choose another --output")
        for name in OUTPUT_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------------------------------------
# small pieces


def _tokenizer_corpus(splits: dict[str, list[dict]], extra_rows: Sequence[dict] = ()) -> list[str]:
    """Every text the models will read, chat-formatted, so the BPE merges fit the real sequences."""
    # The chat template only needs a tokenizer object to render; a throwaway one made from a
    # single word renders exactly what the real one will.
    renderer = build_tiny_tokenizer(["demo"], vocab_size=300)
    texts = []
    for rows in list(splits.values()) + [list(extra_rows)]:
        for row in rows:
            answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
            texts += [chat_prompt_text(renderer, row["question"]) + a for a in answers]
            if isinstance(row.get("paraphrased_answer"), str):
                texts.append(row["paraphrased_answer"])
            if isinstance(row.get("paraphrased_question"), str):
                texts.append(row["paraphrased_question"])
            texts += [t for t in row.get("perturbed_answer", []) if isinstance(t, str)]
    return texts


def alternate_request(question: str, answer: str) -> str:
    """The user message that asks for an answer with changed facts: the very prompt
    ``altpo-fast generate-alternates`` sends."""
    return ALTERNATE_PROMPT.format(question=question, answer=answer)


def alternate_skill_rows(data, retain_split: str, seed: int, variants: int = 4,
                         every_nth_author: int = 1) -> list[dict]:
    """Teach-the-skill rows: for the questions of every ``every_nth_author``-th retain author, the
    changed-facts request and ``variants`` made-up answers (fine-tuning draws one per epoch).

    A real instruct model can already answer with made-up facts when asked; a tiny model trained
    from scratch cannot, so the demo shows it how on retain authors only. For the forget
    questions it then has to generalise, as AltPO's alternates from a real model do.
    """
    rows = []
    per_author = data.questions_per_author
    for index, row in enumerate(data.splits[retain_split]):
        if (index // per_author) % every_nth_author:
            continue
        made_up = data.made_up_answers(row["question"], variants, seed)
        rows.append({"question": alternate_request(row["question"], row["answer"]),
                     "answer": made_up})
    return rows


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs))


def _load_model(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32", trust_remote_code=False)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def _read_eval(folder: Path) -> dict[str, float | None]:
    """Every metric's aggregate from a ``TOFU_EVAL.json``."""
    logs = json.loads((folder / "TOFU_EVAL.json").read_text())
    return {name: entry.get("agg_value") for name, entry in logs.items() if isinstance(entry, dict)}


def forgetting_check(before: dict, after: dict) -> dict:
    """Did the run forget? forget_Q_A_Prob at most half, retain_Q_A_Prob within 10 % relative."""
    f0, f1 = before["forget_Q_A_Prob"], after["forget_Q_A_Prob"]
    r0, r1 = before["retain_Q_A_Prob"], after["retain_Q_A_Prob"]
    ratio = f1 / f0
    change = (r1 - r0) / r0
    halved = ratio <= FORGET_RATIO_LIMIT
    kept = abs(change) <= RETAIN_RELATIVE_TOLERANCE
    return {"forget_Q_A_Prob_before": f0, "forget_Q_A_Prob_after": f1, "forget_ratio": ratio,
            "retain_Q_A_Prob_before": r0, "retain_Q_A_Prob_after": r1,
            "retain_relative_change": change, "forget_halved": halved,
            "retain_within_10_percent": kept, "held": bool(halved and kept)}


# ------------------------------------------------------------------------------------------------
# the run


class _Stages:
    """Numbered stage headers, wall time per stage."""

    def __init__(self, total: int, verbose: bool):
        self.total, self.verbose, self.done = total, verbose, 0
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str, title: str):
        self.done += 1
        if self.verbose:
            print(f"[{self.done}/{self.total}] {title}", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[key] = round(time.perf_counter() - start, 2)


def run_demo(output: str | Path = "altpo-demo", *, preset: str = "default",
             config: DemoConfig | None = None, seed: int = 0, force: bool = False,
             progress: bool = True, verbose: bool = True, threads: int | None = 1,
             method: str = DEFAULT_METHOD, compare: Sequence[str] | None = None) -> dict:
    """Run the whole demo into ``output`` and return its summary (also in ``demo_summary.json``).

    Args:
        output: folder for everything the demo writes (see :data:`OUTPUT_ENTRIES`).
        preset: ``"default"`` or ``"small"`` (see :data:`PRESETS`); ignored when ``config`` is given.
        seed: seed of the data, the model initialisations, the data order and the sampling.
        force: allow a non-empty ``output`` (the demo's own entries in it are replaced).
        progress: tqdm bars; verbose: stage headers and the result table.
        threads: torch CPU threads for the run (restored afterwards); None leaves torch's setting.
            Tiny models gain little from more threads, and threads that share busy cores wait on
            each other, so the default is one.
        method: a registered unlearning method (docs/methods.md), with the demo's recipe for it.
        compare: several methods instead, each from the same full model (e.g.
            :data:`altpo.demo.methods.COMPARE_METHODS`); their metrics side by side in
            ``demo_compare.png`` and the summary's ``methods``.
    """
    methods = check_methods(list(compare) if compare else [method])
    if config is None:
        if preset not in PRESETS:
            raise DemoError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        config = PRESETS[preset]
    if threads is not None and threads < 1:
        raise DemoError(f"threads must be at least 1, got {threads}")
    out = prepare_output(output, force)

    from transformers.utils import logging as hf_logging

    previous_threads = torch.get_num_threads()
    hf_bars = hf_logging.is_progress_bar_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    # transformers' own bars (loading and writing 1 MB weight files) are noise here
    hf_logging.disable_progress_bar()
    try:
        return _run(out, config, seed, progress, verbose, methods)
    finally:
        torch.set_num_threads(previous_threads)
        if hf_bars:
            hf_logging.enable_progress_bar()


def _run(out: Path, config: DemoConfig, seed: int, progress: bool, verbose: bool,
         methods: Sequence[str] = (DEFAULT_METHOD,)) -> dict:
    started = time.perf_counter()
    with_alternates = any(needs_alternates(m) for m in methods)
    stage = _Stages(6 + with_alternates + 2 * len(methods), verbose)
    data_dir, eval_dir = out / "data", out / "eval"
    full_dir, retain_dir = out / "full_model", out / "retain_model"
    forget_split, retain_split = config.forget_split, config.retain_split

    data, general = _make_data(stage, config, seed, data_dir, verbose)
    skill = alternate_skill_rows(data, retain_split, seed,
                                 every_nth_author=config.skill_every_nth_author)
    with stage("tokenizer", "training the tokenizer"):
        tokenizer = build_tiny_tokenizer(_tokenizer_corpus(data.splits, skill),
                                         vocab_size=config.vocab_size)
    with stage("finetune_full", f"fine-tuning the full model on {len(data.splits['full'])} "
               f"author rows + {len(general)} general-knowledge rows + {len(skill)} "
               "changed-facts examples"):
        full_ft = _finetune(tokenizer, config, seed, progress,
                            data.splits["full"] + general * config.general_repeats + skill,
                            full_dir, "fine-tune full")
    with stage("finetune_retain", f"fine-tuning its twin on {retain_split} only (the retain model)"):
        retain_ft = _finetune(tokenizer, config, seed, progress,
                              data.splits[retain_split] + general * config.general_repeats + skill,
                              retain_dir, "fine-tune retain")

    def evaluate(folder: Path, name: str, retain_logs):
        model, tok = _load_model(folder)
        evaluate_tofu(model, tok, str(data_dir), forget_split, retain_logs=retain_logs,
                      output_dir=eval_dir / name, max_new_tokens=config.max_new_tokens,
                      progress=progress, verbose=False)
        return _read_eval(eval_dir / name)

    with stage("eval_retain", "evaluating the retain model (reference for forget quality)"):
        retain_metrics = evaluate(retain_dir, "retain_model", None)
    with stage("eval_before", "evaluating the full model (before unlearning)"):
        before = evaluate(full_dir, "before", eval_dir / "retain_model")

    alternates_path = out / "alternates.jsonl"
    if with_alternates:
        with stage("alternates", f"sampling {config.num_alternates} alternate answers per forget "
                   "question from the full model"):
            alt_report = _generate_alternates(full_dir, data_dir, forget_split, alternates_path,
                                              config, seed, progress)
            if verbose:
                print(f"      {alt_report.describe()}", flush=True)

    runs = {}
    compare = len(methods) > 1
    for method in methods:
        unlearned_dir = out / "unlearned_models" / method if compare else out / "unlearned_model"
        after_name = f"after_{method}" if compare else "after"
        with stage(f"unlearn_{method}", f"unlearning with {method_title(method)} (the altpo-fast "
                   "train code path)"):
            history, _ = _train_method(method, full_dir, data_dir, alternates_path, unlearned_dir,
                                       config, seed, quiet=not progress)
            curve = _probability_curve(full_dir, unlearned_dir, data, config)
        with stage(f"eval_{after_name}", f"evaluating the {method_title(method)} model"):
            after = evaluate(unlearned_dir, after_name, eval_dir / "retain_model")
        runs[method] = {"after": after, "forgetting": forgetting_check(before, after),
                        "curve": [{k: r[k] for k in ("step", "epoch", "loss", "forget_loss",
                                                      "retain_loss")} for r in history],
                        "probabilities": curve}

    common = {"preset_config": dataclasses.asdict(config), "seed": seed,
              "forget_split": forget_split, "retain_split": retain_split, "before": before,
              "retain_model": retain_metrics}
    if compare:
        return _write_compare(out, common, runs, stage.seconds, started, verbose)
    curves = {"finetune_full_loss": full_ft.step_losses, "finetune_retain_loss": retain_ft.step_losses}
    return _write_single(out, common, methods[0], runs[methods[0]], curves, stage.seconds, started,
                         verbose)


def _make_data(stage: _Stages, config: DemoConfig, seed: int, data_dir: Path, verbose: bool):
    """The fictitious-author data set, written to ``data_dir``; returns it and its general rows."""
    with stage("data", "inventing the fictitious-author data set"):
        data = build_synthetic_tofu(
            config.num_authors, config.questions_per_author, forget_percents=(config.forget_percent,),
            num_real_authors=config.num_real_authors, num_world_facts=config.num_world_facts,
            seed=seed)
        data.write(data_dir)
        write_idk_answers(data_dir)
        general = data.splits["real_authors_perturbed"] + data.splits["world_facts_perturbed"]
        if verbose:
            print(f"      {len(data.authors)} authors x {config.questions_per_author} questions "
                  f"({len(data.splits['full'])} rows), {config.forget_split}: "
                  f"{len(data.splits[config.forget_split])} rows, {len(general)} general-knowledge rows "
                  f"-> {data_dir}", flush=True)
    return data, general


def _finetune(tokenizer, config: DemoConfig, seed: int, progress: bool, rows, folder: Path, desc: str):
    """A fresh tiny Llama fine-tuned on ``rows``, saved to ``folder``; returns the fine-tune result."""
    model = build_tiny_llama(tokenizer, hidden_size=config.hidden_size,
                             num_layers=config.num_layers, num_heads=config.num_heads,
                             num_kv_heads=config.num_kv_heads,
                             intermediate_size=config.intermediate_size, seed=seed)
    result = finetune_qa(model, tokenizer, rows, epochs=config.finetune_epochs,
                         batch_size=config.finetune_batch_size, lr=config.finetune_lr,
                         seed=seed, progress=progress, desc=desc)
    save_tiny_model(model, tokenizer, folder)
    return result


def _write_compare(out: Path, common: dict, runs: dict, seconds: dict, started: float,
                   verbose: bool) -> dict:
    """--compare: the summary, its figure and its table."""
    summary = compare_summary(common, runs, seconds, started)
    return _write_outputs(out, summary, plot_compare, COMPARE_PLOT_NAME, format_compare_report, started,
                          verbose)


def _write_single(out: Path, common: dict, method: str, run: dict, finetune_curves: dict,
                  seconds: dict, started: float, verbose: bool) -> dict:
    """One method: the summary, its figure and its table."""
    summary = {
        **common,
        "method": method,
        "after": run["after"],
        "forgetting": run["forgetting"],
        "curves": {
            **finetune_curves,
            "unlearning": run["curve"],
            "probabilities": run["probabilities"],
        },
        "timings_s": seconds,
        "total_time_s": round(time.perf_counter() - started, 2),
        "torch_threads": torch.get_num_threads(),
        "files": {name: name for name in OUTPUT_ENTRIES if (out / name).exists() or name == PLOT_NAME},
    }
    return _write_outputs(out, summary, plot_summary, PLOT_NAME, format_report, started, verbose)


def _write_outputs(out: Path, summary: dict, plot, plot_name: str, report, started: float,
                   verbose: bool) -> dict:
    """The figure, then the summary with the total time (figure included), then the table."""
    plot(summary, out / plot_name)
    summary["total_time_s"] = round(time.perf_counter() - started, 2)
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    if verbose:
        print(report(summary, out), flush=True)
    return summary


# ------------------------------------------------------------------------------------------------
# alternates and unlearning


def _generate_alternates(model_dir: Path, data_dir: Path, forget_split: str, path: Path,
                         config: DemoConfig, seed: int, progress: bool):
    """``num_alternates`` sampled alternates per forget question, as generate-alternates makes them."""
    model, tok = _load_model(model_dir)
    rows = load_tofu_split(str(data_dir), forget_split)
    report = generate_alternates(model, tok, rows, k=config.num_alternates, seed=seed,
                                 output_path=path, max_new_tokens=config.max_new_tokens,
                                 force=True, progress=progress)
    missing = [q for q, kept in report.short if kept == 0]
    if missing:
        raise DemoError(f"the full model repeated the true answer for {len(missing)} forget "
                        f"question(s) (e.g. {missing[0]!r}) in every sample, so AltPO has no "
                        "alternate for them; try another --seed")
    return report


def _train_method(method: str, model_dir: Path, data_dir: Path, alternates: Path, output: Path,
                  config: DemoConfig, seed: int, quiet: bool):
    """``method`` through :func:`altpo.train.train`; a checkpoint every epoch for the curve."""
    recipe = demo_recipe(config, method)
    if needs_alternates(method):
        rows = sum(1 for line in alternates.read_text().splitlines() if line.strip())
    else:
        rows = len(load_tofu_split(str(data_dir), config.forget_split))
    save_every = max(1, rows // recipe["batch_size"])
    cfg = TrainConfig(
        model=str(model_dir), data=str(data_dir), forget_split=config.forget_split,
        retain_split=config.retain_split, output=str(output), method=method,
        alternates=str(alternates) if needs_alternates(method) else None, seed=seed,
        device="cpu", dtype="fp32", save_every=save_every, keep_checkpoints=0, quiet=quiet,
        **recipe)
    result = train(cfg)
    return result.history, save_every


def _probability_curve(full_dir: Path, unlearned_dir: Path, data, config: DemoConfig) -> list[dict]:
    """forget / retain Q_A_Prob at the start, at every checkpoint and at the end of AltPO."""
    forget_rows = data.splits[f"{config.forget_split}_perturbed"]
    retain_rows = data.splits["retain_perturbed"]
    points = [(0, full_dir)] + list_checkpoints(unlearned_dir)
    final_step = json.loads((unlearned_dir / "train_summary.json").read_text())["steps_done"]
    points.append((final_step, unlearned_dir))
    curve = []
    for step, folder in points:
        model, tok = _load_model(folder)
        curve.append({"step": step,
                      "forget_Q_A_Prob": _mean(answer_probabilities(model, tok, forget_rows)),
                      "retain_Q_A_Prob": _mean(answer_probabilities(model, tok, retain_rows))})
    # the curve is recorded; the per-step optimizer states are not worth keeping
    shutil.rmtree(unlearned_dir / CHECKPOINTS, ignore_errors=True)
    return curve


# ------------------------------------------------------------------------------------------------
# report and plot


def format_report(summary: dict, out: Path | None = None) -> str:
    """The before / after / retain-model table and the verdict, as printed at the end."""
    rows = [("metric", "before", "after", "retain model")]
    for name in HEADLINE:
        rows.append((name, _fmt(summary["before"].get(name)), _fmt(summary["after"].get(name)),
                     _fmt(summary["retain_model"].get(name))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c = summary["forgetting"]
    verdict = "HELD" if c["held"] else "DID NOT HOLD"
    lines += [
        "",
        f"forget_Q_A_Prob {c['forget_Q_A_Prob_before']:.4f} -> {c['forget_Q_A_Prob_after']:.4f} "
        f"(x{c['forget_ratio']:.2f}; goal: at most x{FORGET_RATIO_LIMIT}) "
        f"{'ok' if c['forget_halved'] else 'NOT MET'}",
        f"retain_Q_A_Prob {c['retain_Q_A_Prob_before']:.4f} -> {c['retain_Q_A_Prob_after']:.4f} "
        f"({100 * c['retain_relative_change']:+.1f}%; goal: within "
        f"{100 * RETAIN_RELATIVE_TOLERANCE:.0f}%) {'ok' if c['retain_within_10_percent'] else 'NOT MET'}",
        f"forgetting {verdict}. Total time {summary['total_time_s']:.0f} s.",
    ]
    if out is not None:
        lines.append(f"wrote {out / SUMMARY_NAME} and {out / PLOT_NAME}")
    return "\n".join(lines)


def plot_summary(summary: dict, path: Path) -> None:
    """Loss curves, the forget/retain probabilities during AltPO, and before/after bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = summary["curves"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))

    ax = axes[0, 0]
    epochs = summary["preset_config"]["finetune_epochs"]
    for key, label in (("finetune_full_loss", "full model"),
                       ("finetune_retain_loss", f"retain model ({summary['retain_split']})")):
        # per-epoch means: batches are grouped by length, so single steps alternate between
        # memorised answers (tiny loss) and made-up answers (a loss that cannot go to zero)
        losses = curves[key]
        per = max(1, len(losses) // epochs)
        means = [sum(losses[i:i + per]) / len(losses[i:i + per]) for i in range(0, len(losses), per)]
        ax.plot(range(1, len(means) + 1), means, label=label, lw=1.5)
    ax.set_yscale("log")
    ax.set(title="fine-tuning: answer-token NLL (epoch mean)", xlabel="epoch", ylabel="loss")
    ax.legend()

    ax = axes[0, 1]
    title = method_title(summary.get("method", DEFAULT_METHOD))
    steps = [r["step"] for r in curves["unlearning"]]
    ax.plot(steps, [r["loss"] for r in curves["unlearning"]], label="total", lw=1.5)
    ax.plot(steps, [r["forget_loss"] for r in curves["unlearning"]], label="forget term", lw=1)
    ax.plot(steps, [r["retain_loss"] for r in curves["unlearning"]], label="retain term (NLL)", lw=1)
    ax.set(title=f"{title} training loss", xlabel="step", ylabel="loss")
    ax.legend()

    ax = axes[1, 0]
    probs = curves["probabilities"]
    ax.plot([p["step"] for p in probs], [p["forget_Q_A_Prob"] for p in probs], "o-",
            label=f"forget ({summary['forget_split']})")
    ax.plot([p["step"] for p in probs], [p["retain_Q_A_Prob"] for p in probs], "s-",
            label="retain (retain_perturbed)")
    start = probs[0]["forget_Q_A_Prob"]
    ax.axhline(FORGET_RATIO_LIMIT * start, color="grey", ls="--", lw=1,
               label="half the starting forget probability")
    ax.set(title=f"answer probability (Q_A_Prob) during {title}", xlabel="step",
           ylabel="exp(-mean answer NLL)", ylim=(0, 1.05))
    ax.legend()

    ax = axes[1, 1]
    names = ["forget_Q_A_Prob", "retain_Q_A_Prob", "model_utility", "forget_Q_A_ROUGE"]
    width = 0.27
    for k, (key, label) in enumerate((("before", "before"), ("after", f"after {title}"),
                                      ("retain_model", "retain model"))):
        values = [summary[key].get(n) or 0.0 for n in names]
        ax.bar([i + (k - 1) * width for i in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), [n.replace("_Q_A_", "\n") for n in names])
    ax.set(title="TOFU metrics", ylim=(0, 1.05))
    ax.legend()

    fq = summary["before"].get("forget_quality"), summary["after"].get("forget_quality")
    fig.suptitle("altpo-fast demo: forget quality "
                 f"{_fmt(fq[0])} -> {_fmt(fq[1])}, model utility "
                 f"{_fmt(summary['before'].get('model_utility'))} -> "
                 f"{_fmt(summary['after'].get('model_utility'))}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

