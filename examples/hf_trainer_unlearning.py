"""Unlearning inside a transformers ``Trainer``: any method of altpo_kernels.unlearning_loss on
padded batches, with the fused loss (no [tokens, vocab] logits are ever held).

Each training example holds a forget row, a retain row and, for the methods with a chosen side
(``Method.chosen``), a chosen row; the collator pads each group as any HF data collator does
(``input_ids``, ``attention_mask``, ``labels`` with -100 on prompt and padding).
``compute_loss`` turns every group into answer hidden states with
:func:`altpo_kernels.answer_hidden_states` and hands them all to one
:func:`altpo_kernels.unlearning_loss` call. Reference log-probs (methods whose record has uses_reference) come
from a frozen copy of the starting model through :func:`altpo_kernels.batch_answer_logprobs`.

Runs on the CPU in seconds with a tiny random Llama:

    python examples/hf_trainer_unlearning.py --method NAME --steps 4
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from altpo_kernels import answer_hidden_states, batch_answer_logprobs, get_method, unlearning_loss
from altpo_kernels.methods import DEFAULT_METHOD
from altpo_kernels.hf import output_weight


def pad_rows(rows: list[dict], pad_id: int = 0) -> dict:
    """Right-pad ``{"input_ids", "labels"}`` rows: input_ids, attention_mask, labels [B, L]."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate(examples: list[dict]) -> dict:
    """One padded batch per group (forget, retain, chosen), keys ``<group>_<field>``."""
    batch = {}
    for group in ("forget", "retain", "chosen"):
        if group in examples[0]:
            for key, value in pad_rows([e[group] for e in examples]).items():
                batch[f"{group}_{key}"] = value
    return batch


class UnlearningTrainer(Trainer):
    """A ``Trainer`` whose loss is ``unlearning_loss(method=...)`` over the collated groups."""

    def __init__(self, *args, method: str = DEFAULT_METHOD, method_kwargs: dict | None = None,
                 loss_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = get_method(method)  # a registered name, or your own file.py:NAME
        self.method, self.method_kwargs = method, dict(method_kwargs or {})
        self.loss_backend = loss_backend
        self.ref_model = None
        if self.spec.uses_reference:  # the frozen starting model
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def _group(self, inputs, group):
        return (inputs[f"{group}_input_ids"], inputs[f"{group}_attention_mask"], inputs[f"{group}_labels"])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        groups = ["forget", "retain"] + (["chosen"] if self.spec.pairs else [])
        hidden, labels, seq_ids, first, offset = [], [], [], {}, 0
        for group in groups:
            states = answer_hidden_states(model, *self._group(inputs, group))
            hidden.append(states.hidden)
            labels.append(states.labels)
            seq_ids.append(states.rows + offset)
            first[group] = offset
            offset += states.num_rows
        rows = torch.arange(inputs["forget_input_ids"].shape[0], device=hidden[0].device)
        kw = dict(forget_seqs=rows + first["forget"],
                  retain_seqs=torch.arange(inputs["retain_input_ids"].shape[0],
                                           device=rows.device) + first["retain"])
        if self.ref_model is not None:
            with torch.no_grad():
                kw["ref_forget_logps"] = batch_answer_logprobs(
                    self.ref_model, *self._group(inputs, "forget"), backend=self.loss_backend).logps
                if self.spec.pairs:
                    kw["ref_chosen_logps"] = batch_answer_logprobs(
                        self.ref_model, *self._group(inputs, "chosen"), backend=self.loss_backend).logps
        if self.spec.pairs:
            kw["chosen_seqs"] = rows + first["chosen"]
        out = unlearning_loss(torch.cat(hidden), output_weight(model), torch.cat(labels),
                              torch.cat(seq_ids), method=self.spec, backend=self.loss_backend,
                              **self.method_kwargs, **kw)
        return (out.loss, out) if return_outputs else out.loss


def random_rows(n: int, vocab: int, seed: int, min_len: int = 6, max_len: int = 14) -> list[dict]:
    """Token rows of different lengths: a prompt (label -100) and an answer."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        prompt = int(torch.randint(2, length - 2, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def tiny_llama(vocab: int = 256, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))


def examples_for(method: str, n: int, vocab: int, seed: int = 0) -> list[dict]:
    forget, retain = random_rows(n, vocab, seed), random_rows(n, vocab, seed + 1)
    chosen = random_rows(n, vocab, seed + 2)
    out = []
    for i in range(n):
        e = {"forget": forget[i], "retain": retain[i]}
        if get_method(method).pairs:
            e["chosen"] = chosen[i]
        out.append(e)
    return out


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default=DEFAULT_METHOD, help="a registered method, or FILE.py:NAME")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output", default=None, help="Trainer output_dir (default: a temp folder)")
    args = parser.parse_args(argv)
    import tempfile

    model = tiny_llama()
    data = examples_for(args.method, 16, model.config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=args.output or tmp, per_device_train_batch_size=4,
                                  max_steps=args.steps, learning_rate=1e-3, report_to=[],
                                  remove_unused_columns=False, save_strategy="no",
                                  logging_steps=1, use_cpu=True, disable_tqdm=True)
        trainer = UnlearningTrainer(model=model, args=targs, train_dataset=data,
                                    data_collator=collate, method=args.method)
        result = trainer.train()
    print(f"{args.method}: {result.global_step} Trainer steps, final training loss "
          f"{result.training_loss:.4f}; the loss ran through the fused kernel (no logits held)")
    return result.training_loss


if __name__ == "__main__":
    main()
