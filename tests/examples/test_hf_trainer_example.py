"""examples/hf_trainer_unlearning.py: its Trainer's loss and gradients equal the project's own
packed trainer step on the same rows, for every kind of method, and the example trains as a script."""

import copy
import importlib.util
import subprocess
import sys

import pytest
import torch

from altpo.data.packing import ROLE_ALTERNATE, ROLE_FORGET, ROLE_RETAIN, PackUnit, num_loss_tokens, pack_micro_batches
from altpo.model.packed_attention import enable_packed_attention
from altpo.train.step import PackedLoss, forward_backward, sequence_logprobs
from altpo_kernels import METHODS, REGISTRY
from helpers import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "hf_trainer_unlearning.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("hf_trainer_unlearning", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _project_step(model, method, examples):
    """The loss and gradients of altpo-fast's packed step (its loss module and packing)."""
    model = copy.deepcopy(model)
    enable_packed_attention(model, "sdpa")
    seq = lambda r: (r["input_ids"], r["labels"])  # noqa: E731
    refs = sequence_logprobs(model, [seq(e[g]) for e in examples for g in ("forget", "chosen") if g in e],
                             tokens_per_microbatch=4096, loss_backend="torch")
    units, k = [], 0
    for e in examples:
        if REGISTRY[method].pairs:
            rf, rc = float(refs[k]), float(refs[k + 1])
            k += 2
            units.append(PackUnit([seq(e["chosen"]), seq(e["forget"])], [ROLE_ALTERNATE, ROLE_FORGET],
                                  [(0, 1)], [(rc, rf)]))
        else:
            rf = float(refs[k])
            k += 1
            units.append(PackUnit([seq(e["forget"])], [ROLE_FORGET], [(0, 0)], [(rf, rf)]))
        units.append(PackUnit([seq(e["retain"])], [ROLE_RETAIN], retain=[0]))
    module = PackedLoss(model, method, loss_backend="torch")
    module.num_forget_tokens = sum(num_loss_tokens(e["forget"]["labels"]) for e in examples)
    stats = forward_backward(module, pack_micro_batches(units, 70), num_pairs=len(examples),
                             num_retain_tokens=sum(num_loss_tokens(e["retain"]["labels"]) for e in examples))
    return stats.loss, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", METHODS)
def test_trainer_loss_and_gradients_equal_the_project_trainer(method, tmp_path):
    from transformers import TrainingArguments

    ex = _load_example()
    model = ex.tiny_llama(seed=3)
    examples = ex.examples_for(method, 5, model.config.vocab_size, seed=11)
    want_loss, want_grads = _project_step(model, method, examples)

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                             remove_unused_columns=False)
    trainer = ex.UnlearningTrainer(model=model, args=args, train_dataset=examples,
                                   data_collator=ex.collate, method=method, loss_backend="torch")
    loss = trainer.compute_loss(model, ex.collate(examples))
    loss.backward()
    assert abs(float(loss.detach())) > 0
    torch.testing.assert_close(float(loss.detach()), want_loss, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_trainer_example_trains_as_a_script():
    res = subprocess.run([sys.executable, str(EXAMPLE), "--method", "simnpo", "--steps", "2"],
                         capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "simnpo: 2 Trainer steps" in res.stdout
