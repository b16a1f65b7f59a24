"""``altpo_loss``: the fused AltPO loss in AltPO's own argument names.

A thin wrapper of :func:`altpo_kernels.unlearning_loss` with ``method="altpo"``: ``win_seqs`` are
the chosen (alternate) sequences and ``lose_seqs`` the forget answers. With ``alpha=0,
gamma=beta/2`` it is plain DPO.
"""

from __future__ import annotations

import re

from .methods import ALTPO, REGISTRY
from .unlearning_loss import SegmentSumFunction, UnlearningLoss, UnlearningLossOutput, unlearning_loss

__all__ = ["altpo_loss", "AltPOLoss", "AltPOLossOutput", "SegmentSumFunction"]

#: the one output class, under AltPO's name (its ``win_logps``/``lose_logps``/``delta`` aliases)
AltPOLossOutput = UnlearningLossOutput

_DEFAULTS = REGISTRY[ALTPO].defaults
# errors speak the caller's names
_ALTPO_NAMES = {"forget_seqs": "lose_seqs", "chosen_seqs": "win_seqs", "ref_forget_logps": "ref_lose_logps",
                "ref_chosen_logps": "ref_win_logps", "num_forget": "num_pairs"}
_NAME = re.compile(r"\b(" + "|".join(_ALTPO_NAMES) + r")\b")


def altpo_loss(
    hidden,
    weight,
    labels,
    seq_ids,
    win_seqs,
    lose_seqs,
    retain_seqs,
    ref_win_logps,
    ref_lose_logps,
    *,
    beta: float = _DEFAULTS["beta"],
    alpha: float = _DEFAULTS["alpha"],
    gamma: float = _DEFAULTS["gamma"],
    num_pairs: float | None = None,
    num_retain_tokens: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> UnlearningLossOutput:
    """AltPO loss ``gamma * L_forget + alpha * L_retain`` from last hidden states of packed sequences.

    Args:
        hidden: [N, H] last hidden states of all packed tokens (fp32, bf16 or fp16).
        weight: [V, H] lm_head weight. labels: [N] int64, already shifted (``hidden[t]`` predicts
            ``labels[t]``), ``ignore_index`` on prompt and padding tokens.
        seq_ids: [N] index of the packed sequence each token belongs to.
        win_seqs, lose_seqs: [B] per pair, the alternate (chosen) and forget-answer sequence. A
            lose sequence may serve several pairs; its gradient adds up.
        retain_seqs: [R] sequences whose answer tokens get the NLL term (may be empty).
        ref_win_logps, ref_lose_logps: [B] reference-model sequence log-probs per pair.
        beta, alpha, gamma: AltPO's settings. ``alpha=0, gamma=beta/2`` gives plain DPO.
        num_pairs, num_retain_tokens: normalisers of the whole optimizer step when it spans several
            calls (micro-batches, ranks). Default: this call's pair count and retain-token count.
        backend: ``"auto"``, ``"triton"``, ``"torch"``, ``"cuda"`` or ``"reference"``.
    """
    if hasattr(win_seqs, "numel") and win_seqs.numel() == 0:
        raise ValueError("win_seqs is empty: altpo_loss needs at least one pair (for a retain-only "
                         "batch use unlearning_loss with an empty forget_seqs)")
    if (hasattr(win_seqs, "shape") and hasattr(lose_seqs, "shape") and win_seqs.ndim == 1
            and lose_seqs.shape != win_seqs.shape):
        raise ValueError(f"lose_seqs must have {win_seqs.shape[0]} entries (one per pair, as "
                         f"win_seqs), got {tuple(lose_seqs.shape)}")
    try:
        return unlearning_loss(
            hidden, weight, labels, seq_ids, method=ALTPO, forget_seqs=lose_seqs,
            chosen_seqs=win_seqs, retain_seqs=retain_seqs, ref_forget_logps=ref_lose_logps,
            ref_chosen_logps=ref_win_logps, beta=beta, alpha=alpha, gamma=gamma,
            num_forget=num_pairs, num_retain_tokens=num_retain_tokens, ignore_index=ignore_index,
            backend=backend)
    except ValueError as err:
        raise ValueError(_NAME.sub(lambda m: _ALTPO_NAMES[m[1]], str(err))) from None


class AltPOLoss(UnlearningLoss):
    """``nn.Module`` form of :func:`altpo_loss` (AltPO's positional arguments)."""

    def __init__(self, beta: float = _DEFAULTS["beta"], alpha: float = _DEFAULTS["alpha"],
                 gamma: float = _DEFAULTS["gamma"], ignore_index: int = -100, backend: str = "auto"):
        super().__init__(ALTPO, beta=beta, alpha=alpha, gamma=gamma, ignore_index=ignore_index,
                         backend=backend)
        self.beta, self.alpha, self.gamma = (self.hparams[k] for k in ("beta", "alpha", "gamma"))

    def forward(self, hidden, weight, labels, seq_ids, win_seqs, lose_seqs, retain_seqs,
                ref_win_logps, ref_lose_logps, *, num_pairs=None, num_retain_tokens=None):
        return altpo_loss(hidden, weight, labels, seq_ids, win_seqs, lose_seqs, retain_seqs,
                          ref_win_logps, ref_lose_logps, beta=self.beta, alpha=self.alpha,
                          gamma=self.gamma, num_pairs=num_pairs,
                          num_retain_tokens=num_retain_tokens, ignore_index=self.ignore_index,
                          backend=self.backend)
