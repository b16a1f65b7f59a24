"""Small inputs with a clear answer: each message names the input and says what to write."""

from altpo.cli import main as cli_main
from paths import TOFU_FIXTURE


def test_a_negative_gpu_memory_is_called_negative(capsys):
    assert cli_main(["plan", "--model", "llama-3.2-1b", "--gpu-memory=-5GiB"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-memory -5GiB: the size '-5GiB' is negative; a size must be positive" in err
    assert "write a number and a unit" not in err


def test_an_unknown_forget_split_lists_the_splits_there_are(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the data check comes before any load
    assert cli_main(["eval", "--model", str(model), "--data", str(TOFU_FIXTURE), "--forget-split",
                     "forget5", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "lacks forget5.json, forget5_perturbed.json" in err
    assert "the forget splits it has: forget01, forget10 (--forget-split)" in err
    assert not (tmp_path / "out").exists()
