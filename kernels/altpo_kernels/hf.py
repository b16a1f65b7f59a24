"""Drop-in helpers for Hugging Face transformers causal LMs (transformers is imported lazily).

- :func:`packed_hidden_states`: last hidden states of one packed row (several sequences
  concatenated, position ids restarting per sequence), with every sequence isolated from the
  others whatever the model's attention implementation and ``use_cache``.
- :func:`answer_hidden_states`: for a padded batch as any HF data collator makes it
  (``input_ids``, ``attention_mask``, ``labels`` with -100), the hidden states of the answer
  positions only, their next-token labels and their row index: the inputs of
  :func:`altpo_kernels.unlearning_loss`.
- :func:`lm_head`: the backbone, the lm_head weight and the logit scale, refusing heads the
  fused log-probs do not reproduce (soft-capping, a bias); every caller finds the head here.
- :func:`batch_answer_logprobs`: per-row summed answer log-probs of a padded batch through the
  fused kernel, never holding the [tokens, vocab] logits; ``-logps.sum() / num_tokens.sum()``
  is ``model(**batch).loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linear_logprobs import linear_logprobs


class UnsupportedHeadError(ValueError):
    """The model's LM head does something to its logits that the fused log-probs do not reproduce."""


def logit_scale(config) -> float:
    """The multiplier a config puts on the logits after ``lm_head`` (before any soft-capping):
    Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, ``output_multiplier`` or
    ``lm_head_multiplier``; 1.0 when the config names none."""
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        divisor = config.logits_scaling
        scale = divisor if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / divisor
    return 1.0 if scale is None else float(scale)


def _text_config(model):
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _refuse(model, what: str, fix: str) -> UnsupportedHeadError:
    return UnsupportedHeadError(
        f"{type(model).__name__}: {what}, which the fused log-probs do not reproduce (they compute "
        f"log_softmax(hidden @ lm_head.weight.T), times the config's logit scale); {fix}")


@dataclass
class LMHead:
    """A causal LM split where the fused log-probs take over: the decoder stack (ids to last
    hidden states), the lm_head weight [vocab, hidden] and the logit scale the model applies
    after the head. ``scale_hidden(h)`` gives the hidden states whose plain logits
    ``h @ weight.T`` are the model's: the scale is folded into them."""

    backbone: torch.nn.Module
    weight: torch.Tensor
    scale: float = 1.0

    def scale_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.scale == 1.0 else hidden * self.scale


def lm_head(model) -> LMHead:
    """The backbone, LM-head weight and logit scale of a transformers causal LM.

    A logit scale (``logit_scale``, ``logits_scaling``, ...) is kept and folded into the hidden
    states (logits are linear in them). Heads the fused log-probs cannot reproduce are refused
    with :class:`UnsupportedHeadError` naming the config attribute or module: final-logit
    soft-capping, an lm_head bias, no lm_head, a weight not shaped [vocab, hidden].
    """
    config = _text_config(model)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        raise _refuse(model, f"config.final_logit_softcapping = {softcap} soft-caps the logits",
                      "use a model whose config has final_logit_softcapping = None (setting it by "
                      "hand changes the model's outputs)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        raise _refuse(model, "the model has no output embeddings (lm_head) with a weight",
                      "pass a causal LM such as LlamaForCausalLM, not its base model")
    if getattr(head, "bias", None) is not None:
        raise _refuse(model, "its lm_head has a bias", "use a model whose lm_head has no bias "
                      "(altpo_kernels.linear_logprobs(..., bias=, backend='torch') scores such a head, "
                      "the fused losses do not)")
    hidden_size = getattr(config, "hidden_size", None)
    if weight.dim() != 2 or (isinstance(hidden_size, int) and weight.shape[-1] != hidden_size):
        raise _refuse(model, f"its lm_head weight has shape {tuple(weight.shape)}, not [vocab, "
                      f"hidden = {hidden_size}] (a transposed or reshaped head)",
                      "use a head stored as [vocab, hidden], as nn.Linear(hidden, vocab) stores it")
    return LMHead(_backbone(model), weight, logit_scale(config))


def _backbone(model):
    """The decoder stack of a causal LM (``model.model`` for Llama): ids to hidden states."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    if inner is None and hasattr(model, "get_decoder"):
        inner = model.get_decoder()
    if inner is None:
        raise ValueError(f"cannot find the decoder stack of {type(model).__name__}: pass a "
                         "transformers causal LM (with base_model_prefix, e.g. LlamaForCausalLM)")
    return inner


def backbone(model) -> torch.nn.Module:
    """The decoder stack of a causal LM whose head :func:`lm_head` accepts."""
    return lm_head(model).backbone


def output_weight(model) -> torch.Tensor:
    """The lm_head weight [vocab, hidden] of a causal LM (tied or not) whose head :func:`lm_head`
    accepts; hidden states go through :meth:`LMHead.scale_hidden` before meeting it."""
    return lm_head(model).weight


def _seq_lens_from_positions(position_ids: torch.Tensor) -> list[int]:
    starts = (position_ids == 0).nonzero().squeeze(1).tolist()
    if not starts or starts[0] != 0:
        raise ValueError("position_ids must start at 0 and restart at 0 at every packed sequence")
    return [b - a for a, b in zip(starts, starts[1:] + [position_ids.numel()])]


def packed_hidden_states(model, input_ids: torch.Tensor, *, seq_lens=None,
                         position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[T, H] last hidden states of one packed row, each sequence seeing only itself, ready for
    :func:`output_weight` (times the model's logit scale, if its config has one).

    Args:
        model: a transformers causal LM (e.g. ``LlamaForCausalLM``).
        input_ids: [T] (or [1, T]) the concatenated sequences.
        seq_lens: the sequence lengths in row order (sum T); or give ``position_ids`` [T]
            restarting at 0 per sequence.

    A stock forward with restarting position ids is not enough: with the default
    ``use_cache=True`` transformers does not look for packed sequences, so each sequence attends
    to the ones before it. Here the cache is off and isolation is explicit: an eager / SDPA model
    gets a block-diagonal causal mask; flash-attention models and the project's packed attention
    get the restarting position ids with ``use_cache=False`` (both derive the segments from
    them); any other implementation runs one sequence at a time.
    """
    ids = input_ids.reshape(-1)
    if seq_lens is None:
        if position_ids is None:
            raise ValueError("pass seq_lens (the packed sequences' lengths) or position_ids "
                             "(restarting at 0 per sequence)")
        seq_lens = _seq_lens_from_positions(position_ids.reshape(-1))
    seq_lens = [int(n) for n in seq_lens]
    if any(n < 1 for n in seq_lens) or sum(seq_lens) != ids.numel():
        raise ValueError(f"seq_lens {seq_lens} must be positive and sum to the row's "
                         f"{ids.numel()} tokens")
    device = ids.device
    pos = torch.cat([torch.arange(n, device=device) for n in seq_lens])
    seq = torch.repeat_interleave(torch.arange(len(seq_lens), device=device),
                                  torch.tensor(seq_lens, device=device))
    head = lm_head(model)
    body = head.backbone
    impl = str(getattr(model.config, "_attn_implementation", None) or "eager")
    if impl in ("eager", "sdpa"):
        same = seq[:, None] == seq[None, :]
        causal = pos[:, None] >= pos[None, :]
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(ids.numel(), ids.numel(), dtype=dtype, device=device)
        mask.masked_fill_(~(same & causal), torch.finfo(dtype).min)
        out = body(input_ids=ids[None], position_ids=pos[None], attention_mask=mask[None, None],
                   use_cache=False)
        return head.scale_hidden(out.last_hidden_state[0])
    if impl.startswith("flash_attention") or impl.startswith("altpo_packed"):
        out = body(input_ids=ids[None], position_ids=pos[None], use_cache=False)
        return head.scale_hidden(out.last_hidden_state[0])
    parts, start = [], 0
    for n in seq_lens:
        parts.append(body(input_ids=ids[None, start:start + n], position_ids=pos[None, start:start + n],
                          use_cache=False).last_hidden_state[0])
        start += n
    return head.scale_hidden(torch.cat(parts))


@dataclass
class AnswerStates:
    """Answer positions of a padded batch: ``hidden[m]`` predicts ``labels[m]`` of row ``rows[m]``."""

    hidden: torch.Tensor      # [M, H]
    labels: torch.Tensor      # [M] long
    rows: torch.Tensor        # [M] long, the batch row of each position
    num_rows: int


def _check_batch(input_ids, attention_mask, labels):
    for name, t in (("input_ids", input_ids), ("labels", labels)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D [batch, length] tensor, as a data collator makes it")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have input_ids' shape "
                         f"{tuple(input_ids.shape)} (unshifted, -100 on prompt and padding)")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape "
                         f"{tuple(input_ids.shape)}")


def answer_hidden_states(model, input_ids, attention_mask, labels, *,
                         ignore_index: int = -100) -> AnswerStates:
    """Run the decoder on a padded batch and keep only the positions that predict an answer token.

    Labels are unshifted, as for ``model(**batch)``: position t predicts ``labels[:, t + 1]``.
    Only the kept rows of the hidden states go on; no logits are made.
    """
    _check_batch(input_ids, attention_mask, labels)
    head = lm_head(model)
    out = head.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = head.scale_hidden(out.last_hidden_state[:, :-1])
    target = labels[:, 1:]
    keep = target != ignore_index
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(target)[keep]
    return AnswerStates(hidden[keep], target[keep].long(), rows, int(labels.shape[0]))


@dataclass
class BatchLogprobs:
    """Per row of a padded batch: summed answer log-probs (differentiable fp32) and token counts."""

    logps: torch.Tensor       # [B]
    num_tokens: torch.Tensor  # [B] long

    def nll(self) -> torch.Tensor:
        """Token-mean answer NLL of the batch: what ``model(**batch).loss`` computes."""
        return -self.logps.sum() / self.num_tokens.sum().clamp(min=1)


def batch_answer_logprobs(model, input_ids, attention_mask, labels, *, ignore_index: int = -100,
                          backend: str = "auto") -> BatchLogprobs:
    """Summed answer-token log-probs per row of a padded batch, through the fused kernel.

    ``input_ids``, ``attention_mask`` and ``labels`` (unshifted, -100 on prompt and padding) as
    any HF data collator makes them. Differentiable with respect to the model's parameters; the
    [tokens, vocab] logits are never held.
    """
    states = answer_hidden_states(model, input_ids, attention_mask, labels, ignore_index=ignore_index)
    token = linear_logprobs(states.hidden, output_weight(model), states.labels, backend=backend)
    # float64 accumulation, rounded once: no worse than a pairwise .sum() against float64
    logps = torch.zeros(states.num_rows, dtype=torch.float64, device=token.device)
    logps = logps.index_add(0, states.rows, token.double()).float()
    counts = torch.zeros(states.num_rows, dtype=torch.long, device=token.device)
    counts.index_add_(0, states.rows, torch.ones_like(states.rows))
    return BatchLogprobs(logps, counts)
