"""Tiny Llama models and byte-level BPE tokenizers, made on the spot, for tests and the offline demo.

The tokenizer speaks the Llama-3 chat format (header tokens, ``<|eot_id|>``, the system block
with a knowledge cut-off and a ``date_string``), so code written for
``meta-llama/Llama-3.2-1B-Instruct`` runs unchanged on it. Everything here is small enough to
train on two CPU cores in seconds.
"""

from __future__ import annotations

from typing import Iterable

import torch

from altpo.model.saving import make_folder_portable

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [BOS, EOT, START_HEADER, END_HEADER, PAD]

# The Llama-3 instruct layout: a system block that always carries the knowledge cut-off and the
# date, then one header + body + <|eot_id|> per message. `date_string` and the system prompt are
# chat-template variables, as in the Llama-3.2 tokenizers.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: bool = True):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a transformers fast tokenizer.

    Byte-level means any text round-trips through encode/decode, so generated answers can be
    scored with ROUGE exactly as with a real model's tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOT, pad_token=PAD,
        additional_special_tokens=[START_HEADER, END_HEADER],
    )
    if chat_template:
        tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def build_tiny_llama(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 2048,
                     tie_word_embeddings: bool = False, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized for ``tokenizer``, in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def save_tiny_model(model, tokenizer, path) -> None:
    """``save_pretrained`` both, so loading goes through ``from_pretrained`` like a real checkpoint."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    make_folder_portable(path)  # loadable by transformers 4.45+ too
