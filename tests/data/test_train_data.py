"""Trainer data path: TOFU loading, alternates checks, chat tokenisation, step sampling, packing."""

import json
import random

import pytest
import torch

from altpo.cli import UserError
from altpo.data.packing import (
    ROLE_ALTERNATE,
    ROLE_FORGET,
    ROLE_RETAIN,
    PackUnit,
    UnitTooLongError,
    forget_units,
    pack_micro_batches,
    retain_units,
)
from altpo.data.step_sampling import StepSampler
from altpo.model.tiny_llama import build_tiny_tokenizer
from altpo.data.tofu import (
    ChatFormat,
    build_altpo_data,
    encode_qa,
    load_alternates,
    load_tofu_split,
)

ALT01 = "alternates/llama2-7b/forget01/alt5_seed_0.json"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Who wrote the book about rivers?", "Mara Quill wrote it in 1987.",
             "Where was the author born?", "In a small harbour town."] * 5
    return build_tiny_tokenizer(texts, vocab_size=300)


# ------------------------------------------------------------------------------------------------
# splits and alternates


def test_tofu_fixture_splits_and_alternates(tofu_dir):
    forget = load_tofu_split(tofu_dir, "forget01")
    retain = load_tofu_split(tofu_dir, "retain99")
    assert (len(forget), len(retain)) == (40, 200)  # forget01 whole, retain99's first 200 rows
    alts = load_alternates(tofu_dir / ALT01, forget)
    assert [len(a) for a in alts] == [5] * 40
    # the file's rows, read independently, in file order per question
    rows = [json.loads(line) for line in (tofu_dir / ALT01).read_text().splitlines() if line.strip()]
    q0 = forget[0]["question"]
    assert alts[0] == [r["sub_answer"] for r in rows if r["question"] == q0]


def test_split_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tofu_split(tmp_path / "nowhere", "forget01")
    with pytest.raises(UserError, match="split 'forget07' not found"):
        load_tofu_split(tmp_path, "forget07")
    (tmp_path / "forget01.json").write_text("")
    with pytest.raises(UserError, match="is empty"):
        load_tofu_split(tmp_path, "forget01")
    _write_jsonl(tmp_path / "forget05.json", [{"question": "q?", "answer": ""}])
    with pytest.raises(UserError, match="row 0 has no 'answer'"):
        load_tofu_split(tmp_path, "forget05")
    (tmp_path / "forget10.json").write_text('{"question": "q", "answer": "a"}\n{oops\n')
    with pytest.raises(UserError, match="line 2"):
        load_tofu_split(tmp_path, "forget10")


def test_alternates_errors(tmp_path):
    forget = [{"question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(4)]
    good = [{"question": f"Question {i}?", "answer": "x", "alternate": f"Alt {i}.{k}"}
            for i in range(4) for k in range(2)]
    alts = load_alternates(_write_jsonl(tmp_path / "good.jsonl", good), forget)
    assert alts == [[f"Alt {i}.0", f"Alt {i}.1"] for i in range(4)]

    unknown = good + [{"question": "Who is Zed?", "alternate": "Nobody."},
                      {"question": "Where is Ypres?", "sub_answer": "Far."}]
    with pytest.raises(UserError, match=r"2 row\(s\) whose question is not in the forget split.*Who is Zed"):
        load_alternates(_write_jsonl(tmp_path / "unknown.jsonl", unknown), forget)
    with pytest.raises(UserError, match="no usable alternate for 1 of 4 forget questions.*Question 3"):
        load_alternates(_write_jsonl(tmp_path / "missing.jsonl", good[:6]), forget)
    with pytest.raises(UserError, match="needs a 'question' and an 'alternate'"):
        load_alternates(_write_jsonl(tmp_path / "nofield.jsonl", [{"question": "Question 0?"}]), forget)
    with pytest.raises(UserError, match="not found"):
        load_alternates(tmp_path / "absent.jsonl", forget)


# ------------------------------------------------------------------------------------------------
# chat tokenisation


def test_encode_qa_labels_cover_answer_and_end_of_turn(tokenizer):
    q, a = "Who wrote the book about rivers?", "Mara Quill wrote it in 1987."
    enc = encode_qa(tokenizer, q, a, fmt=ChatFormat("You are a helpful assistant.", "10 Apr 2025"))
    # the Llama-3 layout written out by hand, tokenised piece by piece
    prompt = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
              "Cutting Knowledge Date: December 2023\nToday Date: 10 Apr 2025\n\n"
              "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
              f"{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(a + "<|eot_id|>", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == p_ids + a_ids
    assert enc.labels == [-100] * len(p_ids) + a_ids
    assert enc.labels[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer.decode([t for t in enc.labels if t != -100]) == a + "<|eot_id|>"
    assert not enc.truncated

    cut = encode_qa(tokenizer, q, a, max_length=len(p_ids) + 3)
    assert cut.truncated and len(cut.input_ids) == len(p_ids) + 3
    assert cut.labels == [-100] * len(p_ids) + a_ids[:3]


def test_no_chat_template_is_an_error():
    tok = build_tiny_tokenizer(["plain text only"] * 3, vocab_size=280, chat_template=False)
    with pytest.raises(UserError, match="no chat template"):
        encode_qa(tok, "q", "a")


def test_truncation_is_counted(tokenizer):
    forget = [{"question": "Who wrote the book about rivers?", "answer": "Mara Quill wrote it in 1987. " * k}
              for k in (1, 6)]
    retain = [{"question": "Where was the author born?", "answer": "In a small harbour town."}]
    data = build_altpo_data(tokenizer, forget, [["Someone else."], ["Nobody at all. " * 8]], retain,
                            max_length=90)
    lengths = [len(encode_qa(tokenizer, r["question"], r["answer"]).input_ids) for r in forget]
    assert data.truncated["forget"] == sum(n > 90 for n in lengths) >= 1
    assert all(len(s.input_ids) <= 90 for s in data.forget + data.alternates + data.retain)


# ------------------------------------------------------------------------------------------------
# step sampling


def test_steps_are_world_size_invariant_and_ranks_draw_distinct_retain_rows():
    pair_question = [p // 5 for p in range(60)]
    s = StepSampler(60, 500, 12, seed=3, pair_question=pair_question)
    assert s.steps_per_epoch == 5
    seen_epoch0 = []
    for step in range(7):
        one = s.rows(step)
        parts = [s.rows(step, r, 3) for r in range(3)]
        assert sum((p.pairs for p in parts), []) == one.pairs
        assert sum((p.retain for p in parts), []) == one.retain
        assert [len(p.pairs) for p in parts] == [4, 4, 4]
        # ranks take disjoint slots of the step's retain draw: different rows, not one stream thrice
        assert parts[0].retain != parts[1].retain != parts[2].retain
        if step < 5:
            seen_epoch0 += one.pairs
    # epoch 0 covers distinct pairs; the step after the last full step starts a new permutation
    assert len(set(seen_epoch0)) == 60
    assert s.rows(5).epoch == 1
    # a different seed draws differently
    assert StepSampler(60, 500, 12, seed=4).rows(0).retain != s.rows(0).retain


# ------------------------------------------------------------------------------------------------
# packing


def _random_units(gen: random.Random, vocab=50):
    def seq(prompt, answer):
        ids = [gen.randrange(vocab) for _ in range(prompt + answer)]
        return ids, [-100] * prompt + ids[prompt:]

    units = []
    for q in range(5):
        k = gen.randint(1, 4)
        seqs = [seq(gen.randint(2, 9), gen.randint(1, 9)) for _ in range(k + 1)]
        units.append(PackUnit(seqs, [ROLE_FORGET] + [ROLE_ALTERNATE] * k,
                              [(j, 0) for j in range(1, k + 1)],
                              [(gen.uniform(-20, -1), gen.uniform(-20, -1)) for _ in range(k)], key=q))
    for r in range(6):
        units.append(PackUnit([seq(gen.randint(2, 9), gen.randint(1, 9))], [ROLE_RETAIN],
                              retain=[0] * gen.randint(1, 2), key=("r", r)))
    return units


def test_packing_keeps_units_whole_and_restarts_positions():
    gen = random.Random(5678)
    units = _random_units(gen)
    budget = max(u.num_tokens for u in units) + gen.randint(0, 30)
    mbs = pack_micro_batches(units, budget)
    assert sum(mb.num_tokens for mb in mbs) == sum(u.num_tokens for u in units)
    assert all(mb.num_tokens <= budget for mb in mbs)
    placed = sorted(str(u.key) for mb in mbs for u in mb.units)
    assert placed == sorted(str(u.key) for u in units)
    for mb in mbs:
        start = 0
        for s, n in enumerate(mb.seq_lens):
            assert mb.position_ids[start:start + n].tolist() == list(range(n))
            assert (mb.seq_ids[start:start + n] == s).all()
            start += n
        # every pair's sequences are inside the micro-batch, with the unit's reference values
        for unit, base in zip(mb.units, mb.unit_offsets):
            for (w, l), (rw, rl) in zip(unit.pairs, unit.ref_logps):
                i = mb.chosen_seqs.tolist().index(base + w)
                assert mb.forget_seqs[i] == base + l
                assert mb.ref_chosen_logps[i].item() == pytest.approx(rw, rel=1e-6)
                assert mb.ref_forget_logps[i].item() == pytest.approx(rl, rel=1e-6)
            for (ids, labels), off in zip(unit.sequences, range(base, base + len(unit.sequences))):
                first = sum(mb.seq_lens[:off])
                got = mb.labels[first:first + len(ids)].tolist()
                assert got == labels[1:] + [-100]  # shifted inside the sequence only
        assert sorted(mb.retain_seqs.tolist()) == sorted(
            base + r for unit, base in zip(mb.units, mb.unit_offsets) for r in unit.retain)
    with pytest.raises(UnitTooLongError):
        pack_micro_batches(units, max(u.num_tokens for u in units) - 1)


def test_forget_answer_is_packed_once_per_step(tofu_dir, tokenizer):
    forget = load_tofu_split(tofu_dir, "forget01")[:6]
    alts = load_alternates(tofu_dir / ALT01, load_tofu_split(tofu_dir, "forget01"))[:6]
    retain = load_tofu_split(tofu_dir, "retain99")[:10]
    data = build_altpo_data(tokenizer, forget, alts, retain, max_length=256)
    pairs = [0, 1, 2, 7, 12, 13]  # three alternates of question 0, one of q1, two of q2
    units = forget_units(data, pairs) + retain_units(data, [3, 3, 5])
    mbs = pack_micro_batches(units, 4096)
    roles = torch.cat([mb.roles for mb in mbs]).tolist()
    assert roles.count(ROLE_FORGET) == 3 and roles.count(ROLE_ALTERNATE) == 6
    assert roles.count(ROLE_RETAIN) == 2  # row 3 drawn twice is packed once, counted twice
    assert sum(mb.retain_seqs.numel() for mb in mbs) == 3
    assert sum(mb.num_pairs for mb in mbs) == 6
