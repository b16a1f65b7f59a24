"""The model side: loading a causal LM and tokenizer (``loading``), packed varlen attention
(``packed_attention``), activation checkpointing (``activation_checkpointing``), and the tiny
Llama models the demo and the tests build (``tiny_llama``, ``tiny_finetune``)."""
