"""--numerics open-unlearning: the packed, grouped step equals an independent re-implementation of
open-unlearning's per-micro-batch AltPO loss (padded HF forwards, summed answer NLLs, DPO-style
pair loss with the 2/beta scale, the HF token-mean retain loss per micro-batch, each micro-batch
divided by the number of micro-batches), loss and gradient; and the default differs from it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from altpo.data.step_sampling import StepSampler
from altpo.data.tofu import build_altpo_data, load_alternates, load_tofu_split
from altpo.errors import UserError
from altpo.model.packed_attention import enable_packed_attention
from altpo.train import train
from altpo.train.config import TrainConfig
from altpo.train.numerics import (attention_for_masked_keys, check_grouping, grouped_forward_backward,
                                  grouped_micro_batches, loader_groups, open_unlearning_masked_id)
from altpo.train.step import PackedAltPOLoss, forward_backward, step_normalisers
from altpo.data.packing import forget_units, pack_micro_batches, retain_units
from train_fixtures import ALTERNATES, FORGET_ROWS, RETAIN_ROWS, base_settings, build_model_folder
from paths import TOFU_FIXTURE

BETA, ALPHA, GAMMA = 0.5, 2.0, 1.0
BATCH, PER_DEVICE = 6, 3  # two loader micro-batches of three rows (odd sizes)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = build_model_folder(TOFU_FIXTURE, tmp_path_factory.mktemp("model"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    forget = load_tofu_split(TOFU_FIXTURE, "forget01")
    alts = load_alternates(TOFU_FIXTURE / ALTERNATES, forget)[:FORGET_ROWS]
    retain = load_tofu_split(TOFU_FIXTURE, "retain99")[:RETAIN_ROWS]
    data = build_altpo_data(tok, forget[:FORGET_ROWS], alts, retain)
    rows = StepSampler(data.num_pairs, len(data.retain), BATCH, seed=3).rows(1)
    # reference log-probs: fresh random values near the policy's own, so every pair has a real Delta
    g = torch.Generator().manual_seed(7)
    ref_alt = torch.tensor([-2.0 * sum(x != -100 for x in a.labels[1:]) for a in data.alternates])
    ref_alt = ref_alt + torch.randn(len(ref_alt), generator=g) * 4
    ref_fgt = torch.tensor([-2.0 * sum(x != -100 for x in f.labels[1:]) for f in data.forget])
    ref_fgt = ref_fgt + torch.randn(len(ref_fgt), generator=g) * 4
    return model_dir, tok, data, rows, ref_alt, ref_fgt


def _load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _padded(seqs, pad):
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (x, y) in enumerate(seqs):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def _summed_nll(model, seqs, pad):
    ids, labels, mask = _padded(seqs, pad)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    return ce.sum(-1)


def _open_unlearning_step(model, tok, data, rows, ref_alt, ref_fgt):
    """Its formula, written from its trainer's definition: per loader micro-batch, then / G."""
    pad = tok.pad_token_id
    groups = [(rows.pairs[s:s + PER_DEVICE], rows.retain[s:s + PER_DEVICE]) for s in range(0, BATCH, PER_DEVICE)]
    total = 0.0
    for pairs, retain in groups:
        win = [(data.alternates[p].input_ids, data.alternates[p].labels) for p in pairs]
        lose = [(data.forget[data.pair_question[p]].input_ids, data.forget[data.pair_question[p]].labels)
                for p in pairs]
        win_ratio = -_summed_nll(model, win, pad) - ref_alt[pairs]
        lose_ratio = -_summed_nll(model, lose, pad) - ref_fgt[[data.pair_question[p] for p in pairs]]
        forget_loss = -2 / BETA * F.logsigmoid(BETA * (win_ratio - lose_ratio)).mean()
        ids, labels, mask = _padded([(data.retain[r].input_ids, data.retain[r].labels) for r in retain], pad)
        retain_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # HF token mean
        loss = (GAMMA * forget_loss + ALPHA * retain_loss) / len(groups)
        loss.backward()
        total += float(loss.detach())
    return total


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_grouped_step_equals_open_unlearning_formula(setup):
    model_dir, tok, data, rows, ref_alt, ref_fgt = setup
    assert len(rows.pairs) == BATCH and len(set(rows.retain)) > 1

    ours = _load(model_dir)
    enable_packed_attention(ours, "sdpa")
    module = PackedAltPOLoss(ours, beta=BETA, alpha=ALPHA, gamma=GAMMA, loss_backend="torch")
    items = grouped_micro_batches(data, rows.pairs, rows.retain, per_device_batch_size=PER_DEVICE,
                                  num_groups=BATCH // PER_DEVICE, tokens_per_microbatch=400, alpha=ALPHA,
                                  ref_alternates=ref_alt, ref_forget=ref_fgt)
    assert len(items) > BATCH // PER_DEVICE  # the small budget splits groups over micro-batches
    stats = grouped_forward_backward(module, items)
    got = _grads(ours)

    theirs = _load(model_dir)
    expected_loss = _open_unlearning_step(theirs, tok, data, rows, ref_alt, ref_fgt)
    expected = _grads(theirs)
    assert stats.loss == pytest.approx(expected_loss, rel=1e-5)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()))

    # the default (step-level token mean of the retain NLL) is a different gradient
    default = _load(model_dir)
    enable_packed_attention(default, "sdpa")
    units = forget_units(data, rows.pairs, ref_alt, ref_fgt) + retain_units(data, rows.retain)
    num_pairs, num_retain = step_normalisers(units)
    forward_backward(PackedAltPOLoss(default, beta=BETA, alpha=ALPHA, gamma=GAMMA, loss_backend="torch"),
                     pack_micro_batches(units, 4096), num_pairs=num_pairs, num_retain_tokens=num_retain)
    diff = max(float((p.grad - expected[n]).abs().max() / expected[n].abs().max())
               for n, p in default.named_parameters())
    assert diff > 1e-3


def test_loader_groups_and_grouping_errors():
    assert loader_groups([5, 1, 9, 2], [7, 7, 3, 0], 2) == [([5, 1], [7, 7]), ([9, 2], [3, 0])]
    assert loader_groups([5, 1, 9], [], 2) == [([5, 1], []), ([9], [])]
    with pytest.raises(ValueError, match="each slot pairs"):
        loader_groups([1, 2], [3], 2)
    check_grouping(32, 8, 2)
    with pytest.raises(UserError, match="multiple of --per-device-batch-size 8 x 2"):
        check_grouping(24, 8, 2)


def test_training_with_open_unlearning_numerics(tmp_path):
    model_dir = build_model_folder(TOFU_FIXTURE, tmp_path / "model")
    settings = base_settings(TOFU_FIXTURE, model_dir, tmp_path / "run", max_steps=2, batch_size=4,
                             numerics="open-unlearning", per_device_batch_size=2)
    result = train(TrainConfig(**settings))
    assert result.completed and result.history[-1]["loss"] > 0
    bad = base_settings(TOFU_FIXTURE, model_dir, tmp_path / "bad", batch_size=5,
                        numerics="open-unlearning", per_device_batch_size=2)
    with pytest.raises(UserError, match="--per-device-batch-size 2"):
        TrainConfig(**bad).validate()


def test_pad_eos_hides_every_eos_key_in_the_groups_and_changes_the_reference_key(setup):
    _, tok, data, rows, ref_alt, ref_fgt = setup
    eos = tok.eos_token_id
    kw = dict(per_device_batch_size=PER_DEVICE, num_groups=BATCH // PER_DEVICE, tokens_per_microbatch=400,
              alpha=ALPHA, ref_alternates=ref_alt, ref_forget=ref_fgt)
    plain = grouped_micro_batches(data, rows.pairs, rows.retain, **kw)
    assert all(i.micro_batch.key_mask is None for i in plain)  # the default: nothing hidden
    masked = copy.copy(data)
    masked.masked_key_id = eos
    items = grouped_micro_batches(masked, rows.pairs, rows.retain, **kw)
    for item in items:
        mb = item.micro_batch
        assert torch.equal(mb.key_mask, mb.input_ids != eos)
        # each chat-formatted sequence has an in-sequence eot (user turn) and the answer's own
        assert int((~mb.key_mask).sum()) >= 2 * len(mb.seq_lens)
    # cached reference log-probs computed with the mask are not reused without it, nor the reverse
    assert masked.reference_fingerprint() != data.reference_fingerprint()


def test_training_with_pad_eos_hides_eos_keys(tmp_path):
    model_dir = build_model_folder(TOFU_FIXTURE, tmp_path / "model")
    settings = base_settings(TOFU_FIXTURE, model_dir, tmp_path / "own-pad", max_steps=1, batch_size=4,
                             numerics="open-unlearning", per_device_batch_size=2)
    own_pad = train(TrainConfig(**settings))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token  # open-unlearning's Llama-3 set-up
    tok.save_pretrained(model_dir)
    pad_eos = train(TrainConfig(**{**settings, "output": str(tmp_path / "pad-eos")}))
    assert own_pad.completed and pad_eos.completed
    # same weights and rows; only the hidden eot keys change the step's loss
    assert abs(pad_eos.history[-1]["loss"] - own_pad.history[-1]["loss"]) > 1e-4


def test_only_sdpa_hides_keys():
    assert attention_for_masked_keys("auto") == "sdpa"
    assert attention_for_masked_keys("sdpa") == "sdpa"
    for name in ("flash", "torch-varlen"):
        with pytest.raises(UserError, match=f"--attention {name}.*--attention sdpa or auto"):
            attention_for_masked_keys(name)


def test_masked_id_is_eos_only_when_pad_is_unset_or_eos(setup):
    tok = copy.deepcopy(setup[1])
    assert open_unlearning_masked_id(tok) is None  # its own pad token: nothing in-sequence masked
    tok.pad_token = tok.eos_token
    assert open_unlearning_masked_id(tok) == tok.eos_token_id
    tok.pad_token = None
    assert open_unlearning_masked_id(tok) == tok.eos_token_id
