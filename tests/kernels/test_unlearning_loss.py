"""unlearning_loss: every registered method on every fused backend against its float64 reference
(value, both gradients), split-call normalisers, the documented per-token coefficients (which also
check the reference backend), settings at the edge of their range, and input errors."""

import zlib

import pytest
import torch
import torch.nn.functional as F

from altpo_kernels import METHODS, REGISTRY, UnlearningLoss, altpo_loss, unlearning_loss
from altpo_kernels.reference import unlearning_loss_reference
from conftest import kernel_device
from kernel_cases import random_packed_batch

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
# non-default hyper-parameters, so a default silently taken instead would show
HPARAMS = {
    "altpo": dict(beta=0.7, alpha=1.5, gamma=0.9),
    "dpo": dict(beta=0.3, alpha=0.5, gamma=1.2),
    "idkdpo": dict(beta=0.2, alpha=1.0, gamma=1.0),
    "npo": dict(beta=0.4, alpha=1.3, gamma=0.8),
    "simnpo": dict(beta=2.5, delta=0.3, alpha=1.1, gamma=0.5),
    "graddiff": dict(alpha=0.7, gamma=1.4),
    "gradascent": dict(alpha=0.0, gamma=1.0),
}


def method_batch(method, seq_lens, pairs, h, v, dtype, seed, retain=2):
    """Packed random sequences and the index/reference tensors ``method`` takes.

    Sequence 0 has no answer token (an answer truncated away); it is a chosen sequence for the
    pair methods and a forget sequence for the others. Forget sequences repeat.
    """
    b = random_packed_batch(seq_lens, pairs, h, v, dtype, kernel_device(), seed, retain=retain)
    t = dict(hidden=b["hidden"], weight=b["weight"], labels=b["labels"], seq_ids=b["seq_ids"],
             retain_seqs=b["retain_seqs"])
    if REGISTRY[method].pairs:
        t.update(forget_seqs=b["lose_seqs"], chosen_seqs=b["win_seqs"],
                 ref_forget_logps=b["ref_lose_logps"], ref_chosen_logps=b["ref_win_logps"])
    else:
        # sequences 1 and 2 always have answer tokens
        extra = torch.tensor([1, 2], device=b["lose_seqs"].device)
        t["forget_seqs"] = torch.cat([b["lose_seqs"], extra, b["win_seqs"][:1]])
        if REGISTRY[method].uses_reference:
            more = -torch.rand(3, generator=torch.Generator().manual_seed(seed)) * 20
            t["ref_forget_logps"] = torch.cat([b["ref_lose_logps"], more.to(extra.device)])
    return t


def _split(t):
    rest = {k: v for k, v in t.items() if k not in ("hidden", "weight", "labels", "seq_ids")}
    return t["hidden"], t["weight"], t["labels"], t["seq_ids"], rest


def run_reference(method, t, **kw):
    hidden, weight, labels, seq_ids, rest = _split(t)
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    hp = {**REGISTRY[method].defaults, **kw.pop("hp", {})}
    out = unlearning_loss_reference(h, w, labels, seq_ids, method=method, hparams=hp, **rest, **kw)
    out["loss"].backward()
    return out, h.grad, w.grad


def run_fused(method, t, backend, **kw):
    hidden, weight, labels, seq_ids, rest = _split(t)
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = unlearning_loss(h, w, labels, seq_ids, method=method, backend=backend, **rest,
                          **kw.pop("hp", {}), **kw)
    out.loss.backward()
    return out, h.grad, w.grad


def check_close(out, dh, dw, ref, ref_dh, ref_dw, dtype):
    tol = TOL[dtype]
    value_tol = TOL[torch.float32] if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for name in ("loss", "forget_loss", "retain_loss", "forget_logps", "chosen_logps", "score"):
        torch.testing.assert_close(getattr(out, name).double().cpu(), ref[name].detach().double().cpu(),
                                   **value_tol, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(dh.double().cpu(), ref_dh.cpu(), **tol, msg=lambda m: f"d hidden: {m}")
    torch.testing.assert_close(dw.double().cpu(), ref_dw.cpu(), **tol, msg=lambda m: f"d weight: {m}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(method, backend):
    seed = zlib.crc32(repr((method, backend)).encode()) % 10_000
    t = method_batch(method, [5, 9, 3, 12, 7, 6, 1], 4, 19, 67, torch.float32, seed)
    ref, ref_dh, ref_dw = run_reference(method, t, hp=dict(HPARAMS[method]))
    out, dh, dw = run_fused(method, t, backend, hp=dict(HPARAMS[method]))
    assert float(ref["loss"].detach()) != 0.0 and ref_dh.abs().sum() > 0
    check_close(out, dh, dw, ref, ref_dh, ref_dw, torch.float32)
    assert out.hparams == {k: float(v) for k, v in {**REGISTRY[method].defaults, **HPARAMS[method]}.items()}


@pytest.mark.parametrize("method", ["npo", "simnpo", "graddiff", "idkdpo"])
def test_bf16_matches_reference(method):
    t = method_batch(method, [11, 1, 8, 2, 13, 4, 9], 5, 17, 130, torch.bfloat16, 7)
    ref, ref_dh, ref_dw = run_reference(method, t)
    out, dh, dw = run_fused(method, t, "torch")
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    check_close(out, dh, dw, ref, ref_dh, ref_dw, torch.bfloat16)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_two_calls_with_step_normalisers_equal_one_call(method, backend):
    """A step split over two micro-batches: the calls' losses and gradients add up to one call's."""
    a = method_batch(method, [7, 5, 9, 4], 2, 16, 50, torch.float32, 31, retain=1)
    b = method_batch(method, [6, 8, 3, 10, 5], 3, 16, 50, torch.float32, 32, retain=2)
    b["weight"] = a["weight"]
    offset = int(a["seq_ids"].max()) + 1
    shifted = ("seq_ids", "forget_seqs", "chosen_seqs", "retain_seqs")
    joined = {k: (a[k] if k == "weight" else torch.cat([a[k], b[k] + (offset if k in shifted else 0)]))
              for k in a}
    one, one_dh, one_dw = run_fused(method, joined, backend)
    norm = {"num_retain_tokens": one.num_retain_tokens}
    if REGISTRY[method].normaliser == "forget_tokens":
        norm["num_forget_tokens"] = one.num_forget_tokens
    else:
        norm["num_forget"] = one.num_forget
    w = a["weight"].detach().clone().requires_grad_()
    grads_h, total = [], 0.0
    for part in (a, b):
        hidden, _, labels, seq_ids, rest = _split(part)
        h = hidden.detach().clone().requires_grad_()
        out = unlearning_loss(h, w, labels, seq_ids, method=method, backend=backend, **rest, **norm)
        out.loss.backward()
        total = total + out.loss.detach()
        grads_h.append(h.grad)
    torch.testing.assert_close(total, one.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(grads_h), one_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, one_dw, rtol=1e-5, atol=1e-6)


def _documented_coefficients(method, t, hp):
    """c_t = dL/d logp_t per token, from the closed forms of docs/methods.md (float64)."""
    from altpo_kernels.reference import linear_logprobs_reference

    labels, seq_ids = t["labels"], t["seq_ids"]
    token = linear_logprobs_reference(t["hidden"], t["weight"], labels)
    s = int(seq_ids.max()) + 1
    lp = torch.zeros(s, dtype=torch.float64).index_add_(0, seq_ids, token)
    n = torch.zeros(s, dtype=torch.float64).index_add_(0, seq_ids, (labels != -100).double())
    per_seq = torch.zeros(s, dtype=torch.float64)
    f = t["forget_seqs"]
    B = f.numel()
    beta, gamma, alpha = hp.get("beta"), hp["gamma"], hp["alpha"]
    if method in ("altpo", "dpo", "idkdpo"):
        c = t["chosen_seqs"]
        d = (lp[c] - t["ref_chosen_logps"].double()) - (lp[f] - t["ref_forget_logps"].double())
        sig = torch.sigmoid(-beta * d)
        per_seq.index_add_(0, c, -2 * gamma * sig / B)
        per_seq.index_add_(0, f, 2 * gamma * sig / B)
    elif method == "npo":
        per_seq.index_add_(0, f, 2 * gamma * torch.sigmoid(beta * (lp[f] - t["ref_forget_logps"].double())) / B)
    elif method == "simnpo":
        nf = n[f].clamp(min=1)
        per_seq.index_add_(0, f, 2 * gamma * torch.sigmoid(beta * lp[f] / nf + beta * hp["delta"]) / (B * nf))
    else:
        per_seq.index_add_(0, f, torch.full((B,), gamma / float(n[f].sum()), dtype=torch.float64))
    r = t["retain_seqs"]
    per_seq.index_add_(0, r, torch.full((r.numel(),), -alpha / float(n[r].sum()), dtype=torch.float64))
    return per_seq[seq_ids] * (labels != -100).double()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradient_is_documented_coefficient_times_onehot_minus_softmax(method, backend):
    """dH = sum_t c_t (W[label_t] - softmax(z_t) W), with c_t from the docs' closed form: an
    independent check of the fused path and of the float64 reference backend itself."""
    t = method_batch(method, [6, 9, 4, 8, 7], 3, 13, 41, torch.float64, 77)
    hp = {**REGISTRY[method].defaults, **HPARAMS[method]}
    c = _documented_coefficients(method, t, hp)
    probs = torch.softmax(t["hidden"] @ t["weight"].T, dim=-1)
    onehot = F.one_hot(t["labels"].clamp(min=0), t["weight"].shape[0]).double()
    expected_dh = (c[:, None] * (onehot - probs)) @ t["weight"]
    _, dh, _ = run_fused(method, {k: (v.float() if v.is_floating_point() else v) for k, v in t.items()},
                         backend, hp=dict(HPARAMS[method]))
    torch.testing.assert_close(dh.double(), expected_dh, rtol=1e-4, atol=1e-6)


def test_altpo_method_equals_altpo_loss():
    t = method_batch("altpo", [5, 9, 6, 4, 8], 3, 16, 48, torch.float32, 61)
    a = unlearning_loss(t["hidden"], t["weight"], t["labels"], t["seq_ids"], method="altpo",
                        forget_seqs=t["forget_seqs"], chosen_seqs=t["chosen_seqs"],
                        retain_seqs=t["retain_seqs"], ref_forget_logps=t["ref_forget_logps"],
                        ref_chosen_logps=t["ref_chosen_logps"], backend="torch")
    b = altpo_loss(t["hidden"], t["weight"], t["labels"], t["seq_ids"], t["chosen_seqs"],
                   t["forget_seqs"], t["retain_seqs"], t["ref_chosen_logps"], t["ref_forget_logps"],
                   beta=0.5, alpha=2.0, backend="torch")
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.score, b.delta)


@pytest.mark.parametrize("name, value", [("beta", 3.0), ("delta", 0.1), ("gamma", 0.4), ("alpha", 0.3)])
def test_module_form_uses_each_of_its_settings(name, value):
    """Each setting alone moves the loss away from the defaults', and the module follows it (a
    module that dropped a setting would still agree with the function at the defaults)."""
    t = method_batch("simnpo", [5, 9, 6, 4], 3, 16, 48, torch.float32, 62)
    hidden, weight, labels, seq_ids, rest = _split(t)
    default = unlearning_loss(hidden, weight, labels, seq_ids, method="simnpo", backend="torch",
                              **rest).loss
    changed = unlearning_loss(hidden, weight, labels, seq_ids, method="simnpo", backend="torch",
                              **{name: value}, **rest).loss
    assert not torch.allclose(changed, default)  # this setting matters on this batch
    module = UnlearningLoss("simnpo", backend="torch", **{name: value})
    torch.testing.assert_close(module(hidden, weight, labels, seq_ids, **rest).loss, changed)
    assert "method='simnpo'" in repr(module)


@pytest.mark.parametrize("change, message", [
    (dict(method="npx"), "did you mean 'npo'"),
    (dict(method="npo", delta=0.5), "has no setting delta"),
    (dict(method="graddiff", beta=0.5), "has no setting beta"),
    (dict(method="npo", beta=0.0), r"beta must lie in \(0, 1e\+06\]"),
    (dict(method="npo", beta=1e38), r"beta must lie in \(0, 1e\+06\]"),
    (dict(method="npo", alpha=-1.0), r"alpha must lie in \[0, 1e\+06\]"),
    (dict(method="simnpo", delta=float("nan")), "delta must be a finite number"),
    (dict(method="npo", chosen_seqs=torch.tensor([1])), "drop chosen_seqs"),
    (dict(method="npo", ref_forget_logps=None), "pass ref_forget_logps"),
    (dict(method="simnpo"), "uses no reference model"),
    (dict(method="dpo"), "pass chosen_seqs"),
    (dict(method="npo", num_forget=0), "num_forget must be a positive number"),
    (dict(method="npo", num_forget_tokens=3), "averages over forget terms: pass num_forget"),
    (dict(method="graddiff", ref_forget_logps=None, num_forget=2), "pass num_forget_tokens"),
    (dict(method="npo", forget_seqs=torch.tensor([0, 9])), "forget_seqs refers to sequence 9"),
    (dict(method="npo", ref_forget_logps=torch.zeros(3)), "one reference log-prob per forget term"),
])
def test_bad_input_names_the_argument(change, message):
    t = method_batch("npo", [5, 6, 4], 2, 8, 20, torch.float32, 3)
    kw = dict(forget_seqs=t["forget_seqs"], ref_forget_logps=t["ref_forget_logps"],
              retain_seqs=t["retain_seqs"], backend="torch")
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        unlearning_loss(t["hidden"], t["weight"], t["labels"], t["seq_ids"], **kw)


@pytest.mark.parametrize("method", [m for m in METHODS if "beta" in REGISTRY[m].defaults])
@pytest.mark.parametrize("beta", [1e-6, 1e6])
def test_every_accepted_beta_gives_the_reference_value(method, beta):
    """The per-term epilogue runs in float64: at the ends of the accepted range (where fp32 would
    overflow beta * margin or 2 / beta) the fused loss is finite and equals the reference."""
    t = method_batch(method, [5, 9, 3, 12, 7, 6, 1], 4, 19, 67, torch.float32, 11)
    ref, ref_dh, _ = run_reference(method, t, hp=dict(beta=beta))
    out, dh, _ = run_fused(method, t, "torch", hp=dict(beta=beta))
    assert torch.isfinite(out.loss) and torch.isfinite(dh).all()
    torch.testing.assert_close(out.loss.double(), ref["loss"].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dh.double(), ref_dh, rtol=1e-3, atol=1e-4 * float(ref_dh.abs().max()))


def test_every_registered_method_is_complete_and_documented():
    from paths import REPO_ROOT

    methods_doc = (REPO_ROOT / "docs" / "methods.md").read_text()
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.reference is not None, name
        assert {"alpha", "gamma"} <= set(spec.defaults), name
        assert f"| `{name}` |" in methods_doc, f"docs/methods.md has no table row for {name}"


@pytest.mark.parametrize("spec, message", [
    ("no_such_file.py:X", "file no_such_file.py not found"),
    ("altpo_kernels:nothing_here", "is nothing, not an altpo_kernels.Method"),
    ("altpo_kernels.methods:REGISTRY", "is a dict, not an altpo_kernels.Method"),
    ("no_such_package.mod:X", "module 'no_such_package.mod' not found"),
])
def test_a_bad_method_spec_is_named(spec, message):
    t = method_batch("simnpo", [5, 6, 4], 2, 8, 20, torch.float32, 3)
    with pytest.raises(ValueError, match=message):
        unlearning_loss(t["hidden"], t["weight"], t["labels"], t["seq_ids"], method=spec,
                        forget_seqs=t["forget_seqs"], backend="torch")


def test_a_method_without_reference_is_refused_by_the_self_check():
    from altpo_kernels import Method, check_method

    bare = Method("bare", "no reference", dict(alpha=1.0, gamma=1.0),
                  lambda x, hp: (x.forget, x.forget), normaliser="forget_tokens")
    with pytest.raises(AssertionError, match="no float64 reference"):
        check_method(bare)
