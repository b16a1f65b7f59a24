"""``check_method``: one call that compares a method's fused loss with its float64 reference.

For a user's own method (or a new built-in one): random packed sequences, random hidden states
and LM-head weight, reference log-probs near the policy's own, then the loss and both gradients
(hidden, weight) of the fused path against the method's float64 ``reference`` term computed from
materialised logits. Raises ``AssertionError`` naming what disagrees and by how much.
"""

from __future__ import annotations

import torch

from .methods import Method, get_method
from .reference import unlearning_loss_reference
from .unlearning_loss import unlearning_loss


def _random_batch(spec: Method, generator: torch.Generator, num_terms: int, hidden: int, vocab: int):
    """Packed sequences of odd lengths: forget (and chosen) answers, two retain rows, prompts
    ignored, one forget answer with no answer token at all."""
    lengths, roles = [], []
    for i in range(num_terms):
        lengths.append(5 + 3 * i % 7)
        roles.append("forget")
        if spec.pairs:
            lengths.append(4 + 5 * i % 6)
            roles.append("chosen")
    lengths += [6, 9]
    roles += ["retain", "retain"]
    seq_ids = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in enumerate(lengths)])
    n = int(seq_ids.numel())
    labels = torch.randint(0, vocab, (n,), generator=generator)
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    for s, start in enumerate(starts.tolist()):
        labels[start:start + 2] = -100                      # the prompt
    first_forget = roles.index("forget")
    labels[seq_ids == first_forget] = -100                  # an answer cut away entirely
    h = torch.randn(n, hidden, generator=generator, dtype=torch.float64) * 0.5
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * 0.5
    idx = {r: torch.tensor([s for s, x in enumerate(roles) if x == r], dtype=torch.long)
           for r in ("forget", "chosen", "retain")}
    return h, w, labels, seq_ids, idx


def check_method(method, *, backend: str = "auto", seed: int = 0, num_terms: int = 3,
                 hidden: int = 24, vocab: int = 61, rtol: float = 1e-4, **settings) -> dict:
    """Compare ``method``'s fused loss (fp32, ``backend``) with its float64 reference: loss and
    gradients on random inputs. Returns the relative errors; raises AssertionError on a mismatch
    (or when the method has no ``reference``)."""
    spec = get_method(method)
    if spec.reference is None:
        raise AssertionError(f"method {spec.name!r} has no float64 reference to check against: "
                             "give its Method a reference=(x, hp) -> (terms, score) in float64")
    hp = spec.hparams(**settings)
    g = torch.Generator().manual_seed(seed)
    h64, w64, labels, seq_ids, idx = _random_batch(spec, g, num_terms, hidden, vocab)
    kw = dict(forget_seqs=idx["forget"], retain_seqs=idx["retain"])
    if spec.pairs:
        kw["chosen_seqs"] = idx["chosen"]
    if spec.uses_reference:
        kw["ref_forget_logps"] = -torch.rand(num_terms, generator=g, dtype=torch.float64) * 30 - 5
        if spec.pairs:
            kw["ref_chosen_logps"] = -torch.rand(num_terms, generator=g, dtype=torch.float64) * 30 - 5

    ref_h, ref_w = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    ref = unlearning_loss_reference(ref_h, ref_w, labels, seq_ids, method=spec, hparams=hp, **kw)
    ref["loss"].backward()

    fast_h, fast_w = h64.float().requires_grad_(), w64.float().requires_grad_()
    fast_kw = {k: (v.float() if k.startswith("ref_") else v) for k, v in kw.items()}
    out = unlearning_loss(fast_h, fast_w, labels, seq_ids, method=spec, settings=hp,
                          backend=backend, **fast_kw)
    out.loss.backward()

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm().clamp(min=1e-30))

    got, want = float(out.loss.detach()), float(ref["loss"].detach())
    errors = {"loss": abs(got - want) / max(abs(want), 1e-30),
              "grad_hidden": rel(fast_h.grad, ref_h.grad), "grad_weight": rel(fast_w.grad, ref_w.grad)}
    bad = {k: v for k, v in errors.items() if not v <= rtol}
    if bad:
        raise AssertionError(f"method {spec.name!r}: the fused loss differs from its float64 "
                             f"reference beyond rtol {rtol:g}: " +
                             ", ".join(f"{k} {v:.2e}" for k, v in bad.items()))
    return errors
