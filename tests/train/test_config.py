"""TrainConfig: sections that check themselves, a flat view other code reads, the cross-section
rules judged once (by train()), and every setting classified as trajectory or not."""

import dataclasses

import pytest

from altpo.errors import UserError
from altpo.train.config import (FIELDS, SECTIONS, TRAJECTORY_SETTINGS, OptimSettings, TrainConfig,
                                resolve_config)

# written out by hand: the settings a resumed run must agree on (they change the weights reached)
EXPECTED_TRAJECTORY = {
    "model", "tokenizer", "data", "forget_split", "retain_split", "alternates", "max_forget_rows",
    "max_retain_rows", "system_prompt", "date_string", "max_length", "idk_answers", "batch_size",
    "beta", "alpha", "gamma", "method", "delta", "method_settings", "lr", "epochs", "max_steps",
    "warmup_epochs", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm", "seed",
    "dtype", "master_weights", "reference", "lora_rank", "lora_alpha", "lora_targets", "numerics",
    "per_device_batch_size",
}


def test_every_setting_is_deliberately_classified_for_the_trajectory():
    for name, f in FIELDS.items():
        assert isinstance(f.metadata.get("trajectory"), bool), f"{name}: say trajectory=True/False"
    assert set(TRAJECTORY_SETTINGS) == EXPECTED_TRAJECTORY
    assert "output" not in TRAJECTORY_SETTINGS and "gradient_checkpointing" not in TRAJECTORY_SETTINGS


def test_flat_names_build_read_and_write_the_sections():
    config = TrainConfig(model="m", output="o", alternates="a", lr=2e-4, batch_size=8)
    assert config.optim.lr == config.lr == 2e-4 and config.step.batch_size == config.batch_size == 8
    config.lr = 3e-4
    assert config.optim.lr == 3e-4
    flat = config.to_dict()
    assert list(flat) == list(FIELDS) and flat["lr"] == 3e-4 and "optim" not in flat
    assert TrainConfig(**flat) == config
    assert dataclasses.replace(config, seed=7).seed == 7


def test_sections_build_it_too_and_flat_names_win():
    by_section = TrainConfig(io={"model": "m", "output": "o"}, optim=OptimSettings(lr=5e-5, seed=3))
    assert (by_section.model, by_section.lr, by_section.seed) == ("m", 5e-5, 3)
    assert TrainConfig(optim={"lr": 5e-5}, lr=1e-3).lr == 1e-3
    with pytest.raises(TypeError, match="section step has no setting 'lr' .*it is in section optim"):
        TrainConfig(step={"lr": 1e-3})
    with pytest.raises(TypeError, match="unexpected setting 'learning_rate' .*did you mean lr"):
        TrainConfig(learning_rate=1e-3)
    assert set(SECTIONS) == set(TrainConfig(model="m").to_sections())


@pytest.mark.parametrize("settings, message", [
    (dict(batch_size=0), "--batch-size must be at least 1, got 0"),
    (dict(lr=0.0), "--lr must be positive, got 0.0"),
    (dict(max_grad_norm=float("nan")), "--max-grad-norm must be a finite number, got nan"),
    (dict(keep_checkpoints=-1), "--keep-checkpoints must not be negative, got -1"),
    (dict(dtype="fp64"), "--dtype must be one of auto, bf16, fp32, got 'fp64'"),
    (dict(adam_beta2=1.0), "--adam-beta2 must be in [0, 1), got 1.0"),
    (dict(tokens_per_microbatch=8), "--tokens-per-microbatch must be 'auto' or at least 16, got 8"),
    (dict(merge=True), "--merge merges LoRA adapters: it needs --lora-rank R"),
    (dict(resume=True, overwrite=True), "--resume and --overwrite contradict each other"),
    (dict(batch_size="many"), "batch-size must be an integer, got 'many'"),
])
def test_a_section_refuses_its_own_bad_values_when_built(settings, message):
    with pytest.raises(UserError) as err:
        TrainConfig(**settings)
    assert message in str(err.value)


def test_text_values_are_converted_as_the_flags_convert_them():
    config = TrainConfig(lr="1e-3", batch_size="4", resume="false", tokens_per_microbatch=1024)
    assert (config.lr, config.batch_size, config.resume, config.tokens_per_microbatch) == (
        0.001, 4, False, "1024")


def test_cross_section_rules_wait_for_validate():
    config = TrainConfig(model="m", output="o", alternates="a", parallel="fsdp", reference="resident")
    with pytest.raises(UserError, match="--reference resident keeps a whole copy"):
        config.validate()
    with pytest.raises(UserError, match="--output is required"):
        TrainConfig(model="m", alternates="a").validate()


def test_train_refuses_a_config_changed_after_it_was_built(tmp_path):
    from altpo.train import train

    config = TrainConfig(model=str(tmp_path / "m"), output=str(tmp_path / "o"), alternates="a")
    config.lr = -1.0  # a plain attribute write: no check runs here
    with pytest.raises(UserError, match=r"^--lr must be positive, got -1.0$"):
        train(config)
    assert not (tmp_path / "o").exists()


def test_the_train_command_judges_the_config_once(tmp_path, monkeypatch, capsys):
    from altpo.cli import main

    calls = []
    real = TrainConfig.validate
    monkeypatch.setattr(TrainConfig, "validate", lambda self: calls.append(1) or real(self))
    code = main(["train", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o"),
                 "--alternates", "a.jsonl", "--threads", "1"])
    assert code == 2 and "--model" in capsys.readouterr().err
    assert len(calls) == 1


def test_yaml_takes_sections_and_flat_names(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("io:\n  model: m\n  max-length: 256\noptim:\n  lr: 2.0e-5\nseed: 4\n")
    config = resolve_config({"output": "o"}, config_file=cfg)
    assert (config.model, config.max_length, config.lr, config.seed) == ("m", 256, 2e-5, 4)
    cfg.write_text("step:\n  lr: 2.0e-5\n")
    with pytest.raises(UserError, match="section step has no setting 'lr' .*it is in section optim"):
        resolve_config({}, config_file=cfg)
