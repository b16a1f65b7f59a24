"""Membership-inference attacks on TOFU (forget rows = members, holdout rows = non-members).

Every score is signed as open-unlearning signs it, "higher = less likely a member", so each AUC
(holdout labelled 1) is near 1 when the forget set is still recognisably memorised:

- ``mia_loss``, ``mia_zlib``, ``mia_min_k``, ``mia_min_k_plus_plus``: from the teacher-forced
  statistics (the ``mia`` metric group);
- ``mia_gradnorm``: +the mean over parameter tensors of the gradient's L2 norm (the ``gradnorm``
  group; one backward pass per row);
- ``mia_reference``: the target model's average answer NLL minus a reference model's (the
  ``reference`` group; open-unlearning uses the retain model as the reference).

Each entry has open-unlearning's layout: ``{"forget": {...}, "holdout": {...}, "auc",
"agg_value"}`` with per-row ``{"score"}`` records.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from altpo_kernels import linear_logprobs
from altpo_kernels.hf import lm_head

from altpo.data.tofu import IGNORE_INDEX, ChatFormat, encode_qa
from altpo.eval import metrics as M
from altpo.eval.scoring import Scorer, attention_mask, model_device, pad_token_id
from altpo.eval.sharding import Shards
from altpo.progress import progress_bar

MIA_GROUPS = ("mia", "gradnorm", "reference")


def gradnorm_scores(model, tokenizer, pairs, *, fmt: ChatFormat, backend: str = "auto",
                    progress: bool = False, desc: str = "mia_gradnorm",
                    numerics: str = "altpo-fast", shards: Shards = Shards()) -> list[float]:
    """GradNorm attack scores: the mean over parameter tensors of the L2 norm of the gradient of
    the answer's mean token NLL (end-of-turn token left out), one row at a time.

    Positive, as open-unlearning's attack returns them: a row the model has not seen needs a
    larger update, so a larger norm means "less likely a member".
    """
    head = lm_head(model)
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    scores: dict[int, float] = {}
    try:
        for p in params:
            p.requires_grad_(True)
        mine = list(shards.take(list(pairs)))
        for i, (q, a) in progress_bar(mine, desc=desc, unit="row", enabled=progress):
            e = encode_qa(tokenizer, q, a, fmt=fmt)
            ids_t = torch.tensor([e.input_ids])
            mask = attention_mask(ids_t, torch.ones_like(ids_t), pad, numerics).to(device)
            target = torch.tensor(e.labels[1:], device=device)
            valid = target != IGNORE_INDEX
            with torch.enable_grad():
                out = head.backbone(input_ids=ids_t.to(device), attention_mask=mask, use_cache=False)
                hidden = head.scale_hidden(out.last_hidden_state[0, :-1])
                logp = linear_logprobs(hidden[valid], head.weight, target[valid], backend=backend)[:-1]
                if logp.numel() == 0:
                    scores[i] = 0.0
                    continue
                grads = torch.autograd.grad(-logp.mean(), params, allow_unused=True)
            norms = torch.stack([g.float().norm(2) for g in grads if g is not None])
            scores[i] = float(norms.mean())
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    scores = shards.gather(scores)
    return [scores[i] for i in range(len(pairs))]


def reference_scores(target_losses: Sequence[float], reference_losses: Sequence[float]) -> list[float]:
    """Reference attack scores: target average answer NLL minus the reference model's."""
    if len(target_losses) != len(reference_losses):
        raise ValueError(f"{len(target_losses)} target losses but {len(reference_losses)} reference losses")
    return [float(t) - float(r) for t, r in zip(target_losses, reference_losses)]


def mia_entries(model, tokenizer, groups: Sequence[str], sides: Mapping[str, list[tuple[str, str]]], *,
                scorer: Scorer, fmt: ChatFormat, backend: str, progress: bool, min_k: float,
                reference_scorer: Scorer | None = None, numerics: str = "altpo-fast",
                shards: Shards = Shards()) -> dict:
    """The MIA entries of ``groups`` for ``sides = {"forget": pairs, "holdout": pairs}``."""
    logs: dict = {}
    if "mia" in groups:
        scores: dict = {}
        for side, pairs in sides.items():
            stats = scorer.score(pairs, f"mia_{side}", vocab=True)
            texts = [tokenizer.decode(s.labels.tolist(), skip_special_tokens=True) for s in stats]
            scores[side] = {
                "loss": [s.avg_loss for s in stats],
                "zlib": [M.zlib_score(s.avg_loss, t) for s, t in zip(stats, texts)],
                "min_k": [M.min_k_score(s.token_logprobs[:-1], min_k) for s in stats],
                "min_k_plus_plus": [
                    M.min_k_plus_plus_score(s.token_logprobs[:-1], s.vocab_mean[:-1], s.vocab_var[:-1], min_k)
                    for s in stats
                ],
            }
        for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
            logs[f"mia_{attack}"] = M.mia_metric(scores["forget"][attack], scores["holdout"][attack])
    if "gradnorm" in groups:
        scores = {side: gradnorm_scores(model, tokenizer, pairs, fmt=fmt, backend=backend, progress=progress,
                                        desc=f"mia_gradnorm_{side}", numerics=numerics, shards=shards)
                  for side, pairs in sides.items()}
        logs["mia_gradnorm"] = M.mia_metric(scores["forget"], scores["holdout"])
    if "reference" in groups:
        if reference_scorer is None:
            raise ValueError("the reference metric group needs a reference model (reference_model=, "
                             "--reference-model), e.g. the retain model")
        scores = {}
        for side, pairs in sides.items():
            target = [s.avg_loss for s in scorer.score(pairs, f"mia_reference_{side}")]
            ref = [s.avg_loss for s in reference_scorer.score(pairs, f"mia_reference_{side}_ref")]
            scores[side] = reference_scores(target, ref)
        logs["mia_reference"] = M.mia_metric(scores["forget"], scores["holdout"])
    return logs
