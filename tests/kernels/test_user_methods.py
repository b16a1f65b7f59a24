"""A user's own method: the "Your own method" example of docs/methods.md runs as written, and a
method from the user's file trains through ``altpo-fast train --method FILE.py:NAME``."""

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest
import torch

from altpo_kernels import unlearning_loss
from paths import REPO_ROOT, TOFU_FIXTURE
from test_unlearning_loss import method_batch

DOC = REPO_ROOT / "docs" / "methods.md"


def _first_python_block(section: str) -> str:
    text = DOC.read_text()
    body = text[text.index(f"## {section}\n"):]
    return re.search(r"```python\n(.*?)```", body, re.S)[1]


def test_the_docs_own_method_example_runs_as_written():
    code = _first_python_block("Your own method")
    printed = io.StringIO()
    namespace: dict = {"__name__": "docs_example"}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102  (the docs' own example)
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("self-check (relative errors):")
    errors = namespace["check_method"](namespace["HINGE"], backend="torch")
    assert max(errors.values()) < 1e-4
    m = re.fullmatch(r"step 1: forget loss (\S+), retain loss (\S+)", lines[1])
    out = namespace["out"]
    forget_loss = float(out.forget_loss.detach())
    assert float(m[1]) == round(forget_loss, 4) and forget_loss > 0
    # the printed forget loss by hand: mean over the two forget answers of softplus(lp/n + tau),
    # with lp from the loss's own per-sequence log-probs (checked against float64 elsewhere)
    import torch

    per_token = out.forget_logps.double() / torch.tensor([6.0, 8.0], dtype=torch.float64)
    expected = torch.nn.functional.softplus(per_token + 1.0).mean()
    assert abs(forget_loss - float(expected)) < 1e-5


USER_FILE = '''
import torch
import torch.nn.functional as F
from altpo_kernels import Method


def forget_term(x, hp):
    per_token = x.forget / x.lengths
    return F.softplus(per_token + hp["tau"]), per_token


def reference(x, hp):
    per_token = x.forget.double() / x.lengths.double()
    return torch.log1p(torch.exp(per_token + hp["tau"])), per_token


HINGE = Method("hinge", "Hinge", dict(tau=2.0, alpha=1.0, gamma=1.0), forget_term,
               reference=reference, scales=())
'''


def test_a_method_from_the_users_file_trains_through_the_fused_kernel(tmp_path):
    from altpo_kernels import check_method

    path = tmp_path / "my_methods.py"
    path.write_text(USER_FILE)
    spec = f"{path}:HINGE"
    errors = check_method(spec, backend="torch", tau=1.5)
    assert max(errors.values()) < 1e-4
    t = method_batch("simnpo", [5, 9, 3, 12, 7, 6, 1], 4, 19, 67, torch.float32, 5)
    hidden, weight, labels, seq_ids = (t.pop(k) for k in ("hidden", "weight", "labels", "seq_ids"))
    rest = t
    out = unlearning_loss(hidden, weight, labels, seq_ids, method=spec, settings=dict(tau=0.5),
                          backend="torch", **rest)
    assert out.method == "hinge" and out.hparams == dict(tau=0.5, alpha=1.0, gamma=1.0)
    # the forget loss by hand: mean over terms of softplus(lp/n + tau), in float64
    from altpo_kernels.reference import linear_logprobs_reference

    token = linear_logprobs_reference(hidden, weight, labels)
    lp = torch.zeros(int(seq_ids.max()) + 1, dtype=torch.float64).index_add_(0, seq_ids, token)
    n = torch.zeros_like(lp).index_add_(0, seq_ids, (labels != -100).double()).clamp(min=1)
    f = rest["forget_seqs"]
    expected = torch.log1p(torch.exp(lp[f] / n[f] + 0.5)).mean()
    assert float(out.forget_loss) == pytest.approx(float(expected), rel=1e-5)


def test_train_runs_a_method_from_the_users_file(tmp_path):
    from train_fixtures import base_settings, build_model_folder

    (tmp_path / "my_methods.py").write_text(USER_FILE)
    model = build_model_folder(TOFU_FIXTURE, tmp_path / "model")
    settings = base_settings(TOFU_FIXTURE, model, tmp_path / "run", max_steps=2, alternates=None,
                             method=f"{tmp_path / 'my_methods.py'}:HINGE", method_settings="tau=0.5")
    args = []
    for key, value in settings.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    proc = subprocess.run([sys.executable, "-m", "altpo.cli", "train", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["forget_loss"] > 0 for r in records)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["method"].endswith("my_methods.py:HINGE") and saved["method_settings"] == "tau=0.5"
    # a setting the method does not take is refused before any work, naming the flag
    bad = subprocess.run([sys.executable, "-m", "altpo.cli", "train", *args, "--delta", "0.1",
                          "--overwrite"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "has no setting delta" in bad.stderr and "drop --delta" in bad.stderr
