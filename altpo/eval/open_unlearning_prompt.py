"""open-unlearning's prompt for AltPO alternate answers (its ``community/methods/AltPO/generate.py``,
the Llama-3 template that its ``generate.yaml`` selects), for ``generate-alternates --prompt
open-unlearning``.

Its prompt differs from this project's default in every part: a raw text template (not the
tokenizer's chat template) with the system prompt "You are a helpful AI assistant", a newline
after each ``<|eot_id|>``, a space after the assistant header, the true answer followed by an
instruction to change every fact and use a different template, and the assistant turn primed
with "Alternate Answer :". The text is tokenised with the tokenizer's default special tokens, as
its ``tok_batch_encode`` does (a Llama-3 tokenizer so adds a second ``<|begin_of_text|>``). Each
sample is decoded without special tokens, cut before its stop strings (in its order) and stripped.
"""

from __future__ import annotations

from typing import Sequence

INSTRUCTION = (
    "Now pretend you are making things up. Write another answer to the question that is of a "
    "different template than the given answer and changes all facts from what are introduced in "
    "the given answer (changed answers must be plausible while being inconsistent with given "
    "answer). Ensure that your alternate answer is a plausible response to the question and "
    "doesn't change any details mentioned in question and only introduces changes to all the facts "
    "introduced answer."
)

TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful AI assistant<|eot_id|>\n"
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "Question: {question}\nAnswer: {answer}\n" + INSTRUCTION + "<|eot_id|>\n"
    "<|start_header_id|>assistant<|end_header_id|> \n\n"
    "Alternate Answer :"
)

STOP_STRINGS = ("Question:", "Question: ", "Q: ", "Q:")


def prompt_text(question: str, answer: str) -> str:
    """The filled template; fields are replaced as plain text, question first, as its
    ``custom_format`` does (braces in the data are left alone)."""
    return TEMPLATE.replace("{question}", str(question)).replace("{answer}", str(answer))


def prompt_ids(tokenizer, question: str, answer: str) -> list[int]:
    """Token ids of the prompt, with the tokenizer's default special tokens added."""
    return list(tokenizer(prompt_text(question, answer))["input_ids"])


def cut_at_stop_strings(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """The sample up to its first stop string (each string split off in turn), stripped."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text.strip()
