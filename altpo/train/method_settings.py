"""The unlearning method's settings: names, defaults filled into the config, and presets.

``--method`` picks the forget term (docs/methods.md); ``--beta``, ``--alpha``, ``--gamma`` and
``--delta`` left unset take that method's defaults (:data:`altpo_kernels.unlearning_loss.METHOD_DEFAULTS`,
open-unlearning's values), and a hyper-parameter the method does not have is refused.

The presets reproduce open-unlearning's published TOFU recipes for Llama-3.2-1B-Instruct, forget10
(locuslab/open-unlearning at commit d3d7cf9e, December 2025):

- method hyper-parameters: ``configs/trainer/NPO.yaml`` (beta 0.1, alpha 1, gamma 1),
  ``configs/trainer/SimNPO.yaml`` (beta 4.5, delta 0, alpha 1, gamma 0.125),
  ``configs/trainer/DPO.yaml`` (beta 0.1, alpha 1, gamma 1; IdkDPO is DPO with the
  ``TOFU_QA_forget_idk`` data of ``configs/experiment/unlearn/tofu/idk.yaml``),
  ``configs/trainer/GradDiff.yaml`` (alpha 1, gamma 1); all with the NLL retain loss;
- training: ``configs/experiment/unlearn/tofu/default.yaml`` and ``idk.yaml`` (lr 1e-5, weight
  decay 0.01, 10 epochs, 1 warm-up epoch, model ``open-unlearning/tofu_Llama-3.2-1B-Instruct_full``,
  forget10 / retain90), ``scripts/tofu_unlearn.sh`` (batch 4 per device x 2 GPUs x 4 accumulation
  steps = 32 forget rows per step), ``configs/trainer/finetune.yaml`` (bf16, seed 0) and the
  transformers Trainer defaults it keeps (AdamW betas 0.9 / 0.999, eps 1e-8, gradient clipping 1).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from altpo_kernels.unlearning_loss import METHOD_DEFAULTS, METHODS, PREFERENCE_METHODS, method_hparams

from altpo.errors import UserError

if TYPE_CHECKING:
    from altpo.train.config import TrainConfig

METHOD_NAMES = METHODS
#: Methods whose loss uses reference log-probs of the starting model.
REFERENCE_METHODS = PREFERENCE_METHODS + ("npo",)
#: Methods whose chosen answers come from --alternates.
ALTERNATES_METHODS = ("altpo", "dpo")

_OPEN_UNLEARNING_RUN: dict[str, Any] = dict(
    model="open-unlearning/tofu_Llama-3.2-1B-Instruct_full", data="locuslab/TOFU",
    forget_split="forget10", retain_split="retain90", max_length=512, batch_size=32, lr=1e-5,
    epochs=10.0, warmup_epochs=1.0, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
    adam_eps=1e-8, max_grad_norm=1.0, seed=0, dtype="bf16", master_weights="fp32",
)

OPEN_UNLEARNING_PRESETS: dict[str, dict[str, Any]] = {
    "tofu-llama-3.2-1b-forget10-npo": dict(_OPEN_UNLEARNING_RUN, method="npo", beta=0.1,
                                           alpha=1.0, gamma=1.0),
    "tofu-llama-3.2-1b-forget10-simnpo": dict(_OPEN_UNLEARNING_RUN, method="simnpo", beta=4.5,
                                              delta=0.0, alpha=1.0, gamma=0.125),
    "tofu-llama-3.2-1b-forget10-idkdpo": dict(_OPEN_UNLEARNING_RUN, method="idkdpo", beta=0.1,
                                              alpha=1.0, gamma=1.0),
    "tofu-llama-3.2-1b-forget10-graddiff": dict(_OPEN_UNLEARNING_RUN, method="graddiff",
                                                alpha=1.0, gamma=1.0),
}


def fill_method_defaults(config: "TrainConfig") -> None:
    """Unset beta/alpha/gamma/delta take the method's defaults (at construction: code that reads
    a config before validation sees numbers). An unknown method is left for validation to report."""
    for name, value in METHOD_DEFAULTS.get(config.method, {}).items():
        if getattr(config, name) is None:
            setattr(config, name, value)


def resolve_method_settings(config: "TrainConfig") -> None:
    """Fill the method's defaults into ``config`` and refuse settings the method does not use."""
    method = config.method
    if method not in METHODS:
        close = difflib.get_close_matches(str(method).lower(), METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}{hint}")
    given = {name: getattr(config, name) for name in ("beta", "alpha", "gamma", "delta")}
    try:
        hp = method_hparams(method, **given)
    except ValueError as err:
        raise UserError(f"--method {method}: {err}".replace("leave ", "drop --")) from None
    for name in ("beta", "alpha", "gamma", "delta"):
        setattr(config, name, hp.get(name))
    if method in ALTERNATES_METHODS and not config.alternates:
        raise UserError(f"--alternates is required with --method {method}: JSON Lines with "
                        "question, answer and alternate (make them with `altpo-fast "
                        "generate-alternates`)")
    if method not in ALTERNATES_METHODS and config.alternates:
        raise UserError(f"--method {method} does not use --alternates; drop it (altpo and dpo do)")
    if method != "idkdpo" and config.idk_answers:
        raise UserError(f"--idk-answers is for --method idkdpo only; drop it with --method {method}")


def loss_hparams(config: "TrainConfig") -> dict[str, float]:
    """The resolved hyper-parameters the loss takes (only those the method has)."""
    return method_hparams(config.method, beta=config.beta, alpha=config.alpha, gamma=config.gamma,
                          delta=config.delta)
