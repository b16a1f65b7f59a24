"""``altpo-fast train`` as a command: --help, settings precedence, and every bad input.

Each bad input must end with a clear message, exit status 2, and no half-written output: the
output folder is not created, or (for failures during training) holds no final model.
"""

import json
import shutil

import pytest
import torch

import altpo.train.step_runner
from altpo.cli import UserError, main
from altpo.cli.train import add_arguments, config_from_args
from altpo.train.config import FIELDS, PRESETS, TrainConfig, resolve_config
from helpers import ALTERNATES, base_settings, cli_flags


def _argv(settings: dict) -> list[str]:
    return ["train", *cli_flags(settings)]


def _fails(capsys, settings, *expected):
    """Run the command, expect exit 2 and every ``expected`` text in the error message."""
    code = main(_argv(settings))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "altpo-fast train: error:" in err
    for text in expected:
        assert text in err, err
    return err


# ------------------------------------------------------------------------------------------------
# help and settings


def test_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, f in FIELDS.items():
        assert "--" + name.replace("_", "-") in text, name
        first_words = " ".join(f.metadata["help"].split()[:4])
        assert first_words in text, name
    for flag in ("--preset", "--config", "--print-config", "tofu-llama-3.2-1b-forget10"):
        assert flag in text


def test_preset_then_yaml_then_flags(tmp_path, capsys):
    import argparse

    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: tofu-llama-3.2-1b-forget10\nlr: 3.0e-5\nbatch-size: 16\n"
                   "alternates: alts.jsonl\nsave_every: 25\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(cfg), "--batch-size", "8", "--output", "o"])
    config = config_from_args(args)
    preset = PRESETS["tofu-llama-3.2-1b-forget10"]
    assert config.model == preset["model"] == "open-unlearning/tofu_Llama-3.2-1B-Instruct_full"
    assert (config.epochs, config.beta, config.alpha, config.dtype) == (5.0, 0.5, 2.0, "bf16")
    assert config.lr == 3e-5 and config.save_every == 25 and config.alternates == "alts.jsonl"
    assert config.batch_size == 8 and config.output == "o"  # the flag beats the file

    # --print-config writes YAML that --config reads back to the same settings
    assert main(["train", "--config", str(cfg), "--output", "o", "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert resolve_config({}, config_file=printed) == resolve_config(
        {"output": "o"}, config_file=cfg)

    cfg.write_text("learning_rate: 1e-5\n")
    with pytest.raises(UserError, match="unknown setting 'learning_rate'"):
        resolve_config({}, config_file=cfg)
    cfg.write_text("batch_size: many\n")
    with pytest.raises(UserError, match="batch-size must be an integer"):
        resolve_config({}, config_file=cfg)


def test_seed_recipe_preset_matches_design():
    p = PRESETS["tofu-llama-3.2-1b-forget10"]
    assert (p["forget_split"], p["retain_split"], p["batch_size"], p["lr"]) == ("forget10", "retain90", 32, 1e-5)
    assert (p["warmup_epochs"], p["weight_decay"], p["max_grad_norm"], p["seed"]) == (1.0, 0.01, 1.0, 0)
    assert p["system_prompt"] == "You are a helpful assistant." and p["date_string"] == "10 Apr 2025"
    # forget10 x 5 alternates = 2000 pairs: 62 steps an epoch, 310 in all, 62 of warm-up
    from altpo.data.step_sampling import StepSampler

    s = StepSampler(2000, 3600, p["batch_size"], p["seed"])
    assert (s.steps_per_epoch, int(p["epochs"] * s.steps_per_epoch)) == (62, 310)


# ------------------------------------------------------------------------------------------------
# bad inputs before any work


def test_bad_inputs_fail_cleanly(tofu_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = base_settings(tofu_dir, model_dir, out)

    _fails(capsys, {**base, "model": str(tmp_path / "no-such-model")}, "--model", "folder not found")

    no_template = tmp_path / "no_template"
    shutil.copytree(model_dir, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = no_template / "tokenizer_config.json"
    tok_json = json.loads(tok_cfg.read_text())
    tok_json.pop("chat_template", None)
    tok_cfg.write_text(json.dumps(tok_json))
    _fails(capsys, {**base, "model": str(no_template)}, "has no chat template")

    empty = tmp_path / "empty_data"
    empty.mkdir()
    (empty / "forget01.json").write_text("\n")
    _fails(capsys, {**base, "data": str(empty)}, "split 'forget01'", "is empty")

    _fails(capsys, {**base, "batch_size": 21}, "--batch-size 21 is larger than the data",
           "20 alternates", "at most 20")

    rows = [json.loads(x) for x in (tofu_dir / ALTERNATES).read_text().splitlines() if x.strip()]
    stray = tmp_path / "stray.jsonl"
    stray.write_text("".join(json.dumps(r) + "\n" for r in rows + [
        {"question": "Who painted the Blue Harbour series?", "answer": "x", "alternate": "Nobody."}]))
    _fails(capsys, {**base, "alternates": str(stray)}, "1 row(s) whose question is not in the forget",
           "Blue Harbour")

    _fails(capsys, {**base, "tokens_per_microbatch": 200}, "--tokens-per-microbatch 200 is too small",
           "at least")
    _fails(capsys, {**base, "resume": True}, "--resume: no checkpoint")
    _fails(capsys, {**base, "lr": -1}, "--lr must be positive")
    assert not out.exists()  # none of the failures wrote anything

    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    _fails(capsys, base, "already holds a run", "--resume", "--overwrite")
    assert (out / "metrics.jsonl").read_text() == "{}\n"


# ------------------------------------------------------------------------------------------------
# failures during training


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tofu_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    # an absurd learning rate: step 1 throws the weights to ~1e30, step 2's loss is not finite
    settings = base_settings(tofu_dir, model_dir, out, lr=1e30, max_steps=4, save_every=1)
    err = _fails(capsys, settings, "non-finite at step 2", "last good checkpoint",
                 "step-00000001", "--lr")
    assert "step 2" in err
    assert not (out / "config.json").exists()  # no final model
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    # the checkpoint is whole and finite: it loads and holds the step-1 weights
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoints" / "step-00000001" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_out_of_memory_says_what_to_change(tofu_dir, model_dir, tmp_path, capsys, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(altpo.train.step_runner, "forward_backward", no_memory)
    out = tmp_path / "out"
    _fails(capsys, base_settings(tofu_dir, model_dir, out, master_weights="fp32"),
           "ran out of memory", "--tokens-per-microbatch (now 1024)",
           "--gradient-checkpointing on", "altpo-fast plan")
    assert not (out / "config.json").exists()


# ------------------------------------------------------------------------------------------------
# memory settings: flags, the planner on a GPU, defaults on a CPU


def _tiny_data(tokens_per_sequence=(40, 60, 80)):
    from altpo.data.tofu import AltPOData, EncodedQA

    def seq(n):
        return EncodedQA(list(range(n)), [-100] * (n // 2) + list(range(n // 2, n)))

    forget = [seq(n) for n in tokens_per_sequence]
    alternates = [seq(n + 5) for n in tokens_per_sequence for _ in range(3)]
    pair_question = [q for q in range(len(forget)) for _ in range(3)]
    return AltPOData(forget, alternates, pair_question, [seq(120), seq(30)])


def test_memory_settings_follow_the_planner_on_a_gpu(monkeypatch):
    from transformers import LlamaConfig

    from altpo.plan import memory_plan
    from altpo.data.step_sampling import StepSampler
    from altpo.train.memory import memory_settings

    # Llama-3.2-1B's shape; no weights are made, the planner reads the config only
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=True)
    model = type("ConfigOnly", (), {"config": cfg})()
    data = _tiny_data()
    sampler = StepSampler(data.num_pairs, len(data.retain), 4, 0, data.pair_question)
    need = 80 + 3 * 85  # the largest forget answer with its three alternates
    free = 24 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    cuda = torch.device("cuda")
    auto = TrainConfig(model="m", alternates="a", output="o", batch_size=4, dtype="bf16",
                       master_weights="auto")
    got = memory_settings(auto, model, torch.bfloat16, cuda, data, sampler, None)

    def step_tokens(step):
        rows = sampler.rows(step)
        return (sum(len(data.alternates[p].input_ids) for p in rows.step_pairs)
                + sum(len(data.forget[q].input_ids) for q in {data.pair_question[p] for p in rows.step_pairs})
                + sum(len(data.retain[r].input_ids) for r in set(rows.step_retain)))  # a row drawn twice runs once

    # the planner sees the largest step of the first epoch
    largest_step = max(step_tokens(s) for s in range(sampler.steps_per_epoch))
    want = memory_plan.plan_memory(cfg, free, master_weights="auto", optimizer_in_backward="auto",
                                   tokens_per_step=largest_step, max_seq_len=need)
    assert want.fits and got.plan is not None
    assert (got.tokens_per_microbatch, got.checkpointing, got.master_weights,
            got.optimizer_in_backward) == (want.tokens_per_microbatch, want.checkpointing_mode,
                                           want.master_weights, want.optimizer_in_backward)
    assert got.plan.settings["tokens_per_step"] == largest_step

    # 16 GiB free: the fp32 AdamW states fit only with the update inside backward, and the
    # trainer runs it (issue 4's promise); --optimizer-in-backward off then cannot fit
    free = 16 * 2**30
    got = memory_settings(auto, model, torch.bfloat16, cuda, data, sampler, None)
    assert got.optimizer_in_backward and got.plan.fits and got.plan.optimizer_in_backward
    assert got.checkpointing == got.plan.checkpointing_mode and got.master_weights == "kahan"
    off = TrainConfig(**{**auto.to_dict(), "optimizer_in_backward": "off"})
    with pytest.raises(UserError, match="does not fit"):
        memory_settings(off, model, torch.bfloat16, cuda, data, sampler, None)
    # several processes: auto never picks it
    free = 24 * 2**30
    got = memory_settings(auto, model, torch.bfloat16, cuda, data, sampler, None, world=2)
    assert not got.optimizer_in_backward and not got.plan.optimizer_in_backward
    free = 24 * 2**30

    # explicit flags win over the plan; a resumed run keeps its saved master-weights mode
    fixed = TrainConfig(**{**auto.to_dict(), "tokens_per_microbatch": "4096",
                           "gradient_checkpointing": "on"})
    got = memory_settings(fixed, model, torch.bfloat16, cuda, data, sampler, "kahan")
    assert (got.tokens_per_microbatch, got.checkpointing, got.master_weights) == (4096, "layers", "kahan")

    # a budget that cannot fit says so before any work, with the smallest budget that would
    free = 6 * 2**30
    with pytest.raises(UserError, match="does not fit.*smallest budget that fits"):
        memory_settings(auto, model, torch.bfloat16, cuda, data, sampler, None)

    # on a CPU: fixed defaults, raised to the largest group when that is longer
    got = memory_settings(auto, model, torch.float32, torch.device("cpu"), data, sampler, None)
    assert (got.tokens_per_microbatch, got.checkpointing, got.master_weights, got.plan,
            got.optimizer_in_backward) == (2048, "none", "fp32", None, False)
