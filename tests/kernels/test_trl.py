"""altpo_kernels.trl against TRL itself: the fused head's fields, and two DPO steps end to end.

Every comparison is with stock TRL 1.16 (its own ``add_fused_lm_head`` and ``DPOTrainer``) on a
seeded tiny Llama in fp32 on the CPU.
"""

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl", reason="altpo_kernels.trl needs the trl extra")  # in the test extra

import trl  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402
from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head  # noqa: E402

from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer  # noqa: E402
from altpo_kernels import trl as ours  # noqa: E402

ALL_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")

PROMPTS = [f"Question {i}: what does author {i} write about?" for i in range(8)]
CHOSEN = [f" Author {i} writes quiet novels about rivers and {i} old towns." for i in range(8)]
REJECTED = [f" I think author {i} mostly writes loud poems on {i} cities." for i in range(8)]


def tiny(seed=3, vocab=300):
    tok = build_tiny_tokenizer(PROMPTS + CHOSEN + REJECTED, vocab_size=vocab, chat_template=False)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, seed=seed)
    return tok, model


def batch(vocab, seed=0, shape=(3, 11)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    labels = ids.clone()
    labels[0, :4] = -100          # a prompt
    labels[2, -3:] = -100         # padding
    return ids, labels


def run_head(patch, model, ids, labels, **kw):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, **kw)
    loss = out.log_probs.sum() * 0.37
    if out.entropy is not None:   # TRL's entropy carries a gradient too
        loss = loss + (out.entropy * torch.linspace(-1, 1, out.entropy.shape[-1])).sum() * 0.11
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fields_and_gradients_match_trl(temperature):
    _, base = tiny()
    vocab = base.config.vocab_size
    ids, labels = batch(vocab)
    theirs, mine = copy.deepcopy(base), copy.deepcopy(base)
    trl_add_fused_lm_head(theirs, temperature=temperature, outputs=ALL_OUTPUTS)
    ours.add_fused_lm_head(mine, temperature=temperature, outputs=ALL_OUTPUTS, backend="torch")
    ref, ref_grads = run_head(None, theirs, ids, labels)
    got, got_grads = run_head(None, mine, ids, labels)
    assert isinstance(got, FusedCausalLMOutput)
    assert got.log_probs.shape == (3, 10)
    assert torch.equal(got.label_mask, ref.label_mask)
    assert float(got.log_probs.abs().sum()) > 0
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-5,
                                   msg=name)
    assert torch.equal(got.is_top1, ref.is_top1)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert set(got_grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_shift_labels_and_num_items_match_trl():
    _, base = tiny(seed=4)
    ids, labels = batch(base.config.vocab_size, seed=1)
    theirs, mine = copy.deepcopy(base), copy.deepcopy(base)
    trl_add_fused_lm_head(theirs)
    ours.add_fused_lm_head(mine, backend="torch")
    kw = dict(shift_labels=labels, num_items_in_batch=torch.tensor(7))
    ref, _ = run_head(None, theirs, ids, None, **kw)
    got, _ = run_head(None, mine, ids, None, **kw)
    assert got.log_probs.shape == (3, 11) and got.entropy is None
    torch.testing.assert_close(got.log_probs, ref.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_plain_forward_is_the_models_own():
    _, base = tiny(seed=5)
    ids, _ = batch(base.config.vocab_size, seed=2)
    mine = copy.deepcopy(base)
    ours.add_fused_lm_head(mine, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=ids).logits, base(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_softcapping_falls_back_to_trl_with_a_warning():
    _, base = tiny(seed=6)
    base.config.final_logit_softcapping = 5.0
    ids, labels = batch(base.config.vocab_size, seed=3)
    theirs, mine = copy.deepcopy(base), copy.deepcopy(base)
    trl_add_fused_lm_head(theirs)
    with pytest.warns(UserWarning, match="final_logit_softcapping.*TRL's own"):
        ours.add_fused_lm_head(mine)
    ref, _ = run_head(None, theirs, ids, labels)
    got, _ = run_head(None, mine, ids, labels)
    torch.testing.assert_close(got.log_probs, ref.log_probs, rtol=0, atol=0)


def test_bad_arguments_are_named():
    _, model = tiny(seed=7)
    with pytest.raises(ValueError, match="unknown outputs.*'logits'"):
        ours.add_fused_lm_head(model, outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="temperature must be positive"):
        ours.add_fused_lm_head(model, temperature=0.0)


def dpo_run(trainer_cls, tok, base, tmp_path, steps=2):
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = trl.DPOConfig(  # fp32: bf16=False, since DPOConfig defaults to bf16 autocast
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=11, beta=0.1,
        lr_scheduler_type="constant", disable_tqdm=True, dataloader_num_workers=0, bf16=False,
    )
    policy, reference = copy.deepcopy(base), copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model=policy, ref_model=reference, args=args, train_dataset=data,
                              processing_class=tok)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_two_dpo_steps_match_stock_trl(tmp_path):
    tok, base = tiny(seed=8)
    initial = {n: p.detach().clone() for n, p in base.named_parameters()}
    ref_losses, ref_weights = dpo_run(trl.DPOTrainer, tok, base, tmp_path / "trl")
    losses, weights = dpo_run(ours.DPOTrainer, tok, base, tmp_path / "ours")
    assert len(losses) == len(ref_losses) == 2
    for got, want in zip(losses, ref_losses):
        assert got == pytest.approx(want, rel=1e-4)
    moved = max(float((ref_weights[n] - initial[n]).abs().max()) for n in initial)
    assert moved > 1e-4  # the steps did train
    for name, want in ref_weights.items():
        diff = float((weights[name] - want).abs().max())
        assert diff <= 1e-4, f"{name}: {diff}"


def test_dpo_trainer_patches_policy_and_reference_with_the_kernel(tmp_path, monkeypatch):
    tok, base = tiny(seed=9)
    calls = []
    real = ours.linear_logprobs

    def counting(*a, **k):
        calls.append(a[0].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(ours, "linear_logprobs", counting)
    dpo_run(ours.DPOTrainer, tok, base, tmp_path, steps=1)
    # one step: the reference's forward and the policy's forward each score the batch once
    assert len(calls) == 2 and all(n > 0 for n in calls)
