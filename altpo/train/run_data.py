"""A run's data: the tokenizer, the TOFU rows, the method's chosen answers, the tokenised
:class:`~altpo.data.tofu.AltPOData`, and the sampler that gives every step its rows."""

from __future__ import annotations

from dataclasses import dataclass

from altpo.data.data_checks import check_answer_tokens, check_retain_overlap, duplicate_alternates_note
from altpo.data.step_sampling import StepSampler
from altpo.data.tofu import AltPOData, ChatFormat, build_altpo_data, load_tofu_split, truncation_report
from altpo.errors import UserError
from altpo.model.loading import load_tokenizer
from altpo.train.methods import method_alternates
from altpo.train.numerics import check_grouping, open_unlearning_masked_id


@dataclass
class RunData:
    tokenizer: object
    forget_rows: list
    retain_rows: list
    alternates: list
    data: AltPOData
    sampler: StepSampler


def load_run_data(config, dist, say) -> RunData:
    """Load, check and tokenise the run's data (with the chat template); the step sampler."""
    tokenizer = load_tokenizer(config.tokenizer or config.model,
                               "--tokenizer" if config.tokenizer else "--model")
    fmt = ChatFormat(config.system_prompt or None, config.date_string)
    forget_rows = load_tofu_split(config.data, config.forget_split)
    retain_rows = load_tofu_split(config.data, config.retain_split)
    check_retain_overlap(forget_rows, retain_rows, config.forget_split, config.retain_split)
    retain_rows = retain_rows[: config.max_retain_rows]
    # alternates are checked against the whole split, then cut with it
    alternates = method_alternates(config, forget_rows)[: config.max_forget_rows]
    forget_rows = forget_rows[: config.max_forget_rows]
    data = build_altpo_data(tokenizer, forget_rows, alternates, retain_rows, fmt=fmt,
                            max_length=config.max_length)
    check_answer_tokens(data, config.max_length)
    for note in (duplicate_alternates_note(alternates, config.alternates),
                 truncation_report(data, config.max_length)):
        if note:
            say(note)
    check_batch_size(config, data, dist.world)
    open_unlearning = config.numerics == "open-unlearning"
    if open_unlearning:
        check_grouping(config.batch_size, config.per_device_batch_size, dist.world)
        # its collator's attention mask: with pad = eos, every in-sequence eos is hidden as a key
        data.masked_key_id = open_unlearning_masked_id(tokenizer)
    # open-unlearning numerics: pairs stay in the loader's order, grouped as its loader groups them
    sampler = StepSampler(data.num_pairs, len(data.retain), config.batch_size, config.seed,
                          None if open_unlearning else data.pair_question)
    return RunData(tokenizer, forget_rows, retain_rows, alternates, data, sampler)


def check_batch_size(config, data: AltPOData, world: int) -> None:
    if config.batch_size > data.num_pairs:
        raise UserError(
            f"--batch-size {config.batch_size} is larger than the data: {config.forget_split} has "
            f"{len(data.forget)} questions with {data.num_pairs} alternates in all; lower "
            f"--batch-size to at most {data.num_pairs}"
        )
    if config.batch_size < world:
        raise UserError(f"--batch-size {config.batch_size} is smaller than the {world} "
                        "processes; every process needs at least one forget pair")
