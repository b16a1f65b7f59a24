"""The synthetic fictitious-author data set: TOFU layout and fields, determinism, disjoint authors."""

import hashlib
import json
import re

import pytest

from altpo.data.synthetic_authors import (
    MAX_QUESTIONS_PER_AUTHOR,
    build_synthetic_tofu,
    valid_forget_percents,
    write_synthetic_tofu,
)

# The fields of every TOFU file, as in the hub's locuslab/TOFU (fixtures/tofu/SOURCES.md).
QA = {"question", "answer"}
PERTURBED = QA | {"paraphrased_answer", "perturbed_answer", "paraphrased_question"}
GENERAL_PERTURBED = QA | {"perturbed_answer"}
MULTIPLE_CHOICE = QA | {"option1", "option2", "option3", "option4"}


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    data = write_synthetic_tofu(folder, num_authors=20, questions_per_author=6, seed=3,
                                num_real_authors=12, num_world_facts=9)
    return folder, data


def test_files_and_fields_follow_the_tofu_layout(written):
    folder, _ = written
    expected = {"full": QA, "forget05": QA, "forget10": QA, "retain95": QA, "retain90": QA,
                "holdout05": QA, "holdout10": QA, "forget05_perturbed": PERTURBED,
                "forget10_perturbed": PERTURBED, "retain_perturbed": PERTURBED,
                "real_authors": MULTIPLE_CHOICE, "world_facts": MULTIPLE_CHOICE,
                "real_authors_perturbed": GENERAL_PERTURBED,
                "world_facts_perturbed": GENERAL_PERTURBED}
    stems = {p.stem for p in folder.glob("*.json")}
    assert stems == set(expected)
    sizes = {"full": 120, "forget05": 6, "forget10": 12, "retain95": 114, "retain90": 108,
             "holdout05": 6, "holdout10": 12, "forget05_perturbed": 6, "forget10_perturbed": 12,
             "retain_perturbed": 12, "real_authors": 12, "real_authors_perturbed": 12,
             "world_facts": 9, "world_facts_perturbed": 9}
    for stem, fields in expected.items():
        rows = _read(folder / f"{stem}.json")
        assert len(rows) == sizes[stem], stem
        for row in rows:
            assert set(row) == fields, (stem, row)
            for key in fields - {"perturbed_answer"}:
                assert isinstance(row[key], str) and row[key].strip(), (stem, key)
    for row in _read(folder / "forget10_perturbed.json") + _read(folder / "retain_perturbed.json"):
        wrong = row["perturbed_answer"]
        assert len(wrong) == 5 and len(set(wrong)) == 5
        assert row["paraphrased_answer"] not in wrong and row["answer"] != row["paraphrased_answer"]
    for stem in ("real_authors", "world_facts"):
        plain, pert = _read(folder / f"{stem}.json"), _read(folder / f"{stem}_perturbed.json")
        for mc, p in zip(plain, pert):
            options = [mc[f"option{i}"] for i in range(1, 5)]
            assert mc["question"] == p["question"] and mc["answer"] == p["answer"]
            assert options.count(mc["answer"]) == 1
            assert sorted(p["perturbed_answer"]) == sorted(o for o in options if o != mc["answer"])


# the TOFU file of the same kind, where the fixture does not carry the same split
SAME_KIND = {"forget05": "forget10", "forget05_perturbed": "forget10_perturbed", "retain95": "retain90",
             "holdout05": "holdout10"}


def test_fields_match_the_tofu_files(written, tofu_dir):
    folder, _ = written
    for path in sorted(folder.glob("*.json")):
        theirs = _read(tofu_dir / f"{SAME_KIND.get(path.stem, path.stem)}.json")[0]
        ours = _read(path)[0]
        assert set(ours) == set(theirs), path.name
        assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in theirs.items()}


def test_no_tofu_text_is_reused(written, tofu_dir):
    folder, _ = written
    tofu_texts = set()
    for path in tofu_dir.glob("*.json"):
        for row in _read(path):
            tofu_texts.update(v for v in row.values() if isinstance(v, str) and len(v) > 25)
    ours = set()
    for path in folder.glob("*.json"):
        for row in _read(path):
            ours.update(v for v in row.values() if isinstance(v, str) and len(v) > 25)
    assert ours and not ours & tofu_texts


def test_splits_are_slices_of_full_like_tofu(written):
    folder, _ = written
    full = _read(folder / "full.json")
    for pct, k in ((5, 6), (10, 12)):
        assert _read(folder / f"forget{pct:02d}.json") == full[-k:]
        assert _read(folder / f"retain{100 - pct:02d}.json") == full[:-k]
        pert = _read(folder / f"forget{pct:02d}_perturbed.json")
        assert [{"question": r["question"], "answer": r["answer"]} for r in pert] == full[-k:]
    retain_pert = _read(folder / "retain_perturbed.json")
    assert [{"question": r["question"], "answer": r["answer"]} for r in retain_pert] == full[:12]


def _authors_in(rows, names):
    found = set()
    for row in rows:
        hits = [n for n in names if re.search(rf"\b{re.escape(n)}\b", row["question"])]
        assert len(hits) == 1, row["question"]
        assert hits[0] in row["answer"]
        found.add(hits[0])
    return found


def test_forget_retain_and_holdout_are_disjoint_authors(written):
    folder, data = written
    profiles = _read(folder / "synthetic_authors.jsonl")
    names = [p["name"] for p in profiles]
    assert len(set(names)) == len(names) == 20 + 2  # the full set and the largest holdout
    for pct, k in ((5, 1), (10, 2)):
        forget = _authors_in(_read(folder / f"forget{pct:02d}.json"), names)
        retain = _authors_in(_read(folder / f"retain{100 - pct:02d}.json"), names)
        holdout = _authors_in(_read(folder / f"holdout{pct:02d}.json"), names)
        assert (len(forget), len(retain), len(holdout)) == (k, 20 - k, k)
        assert not forget & retain and not forget & holdout and not retain & holdout
        assert not holdout & _authors_in(_read(folder / "full.json"), names)
        # the retain_perturbed authors are never forgotten
        assert not _authors_in(_read(folder / "retain_perturbed.json"), names) & forget


def test_answers_state_the_profile_facts(written):
    folder, _ = written
    profiles = {p["name"]: p for p in _read(folder / "synthetic_authors.jsonl")}
    rows = _read(folder / "full.json")
    for start in range(0, len(rows), 6):
        block = rows[start:start + 6]
        name = next(n for n in profiles if n in block[0]["question"])
        p = profiles[name]
        assert f"born in {p['birth_city']}, {p['birth_country']}" in block[0]["answer"]
        assert p["birth_date"] in block[1]["answer"]
        assert p["genre"] in block[2]["answer"]
        assert p["first_book"] in block[3]["answer"] and p["famous_book"] in block[4]["answer"]
        assert f"{p['award']} in {p['award_year']}" in block[5]["answer"]


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    kwargs = dict(num_authors=10, questions_per_author=4, num_real_authors=5, num_world_facts=5)
    write_synthetic_tofu(tmp_path / "a", seed=11, **kwargs)
    write_synthetic_tofu(tmp_path / "b", seed=11, **kwargs)
    write_synthetic_tofu(tmp_path / "c", seed=12, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    a, c = _read(tmp_path / "a" / "full.json"), _read(tmp_path / "c" / "full.json")
    assert len(a) == len(c) == 40 and a != c


def test_the_project_loader_reads_it(written):
    from altpo.data.tofu import load_tofu_split

    folder, _ = written
    rows = load_tofu_split(str(folder), "forget10_perturbed",
                           fields=("question", "answer", "paraphrased_answer"))
    assert len(rows) == 12 and isinstance(rows[0]["perturbed_answer"], list)


def test_bad_sizes_are_refused():
    assert valid_forget_percents(100) == (1, 5, 10)
    assert valid_forget_percents(20) == (5, 10)
    assert valid_forget_percents(30) == (10,)
    with pytest.raises(ValueError, match="multiple of 10"):
        build_synthetic_tofu(num_authors=7)
    with pytest.raises(ValueError, match="forget percent 5"):
        build_synthetic_tofu(num_authors=30, forget_percents=(5,))
    with pytest.raises(ValueError, match="questions_per_author"):
        build_synthetic_tofu(num_authors=10, questions_per_author=MAX_QUESTIONS_PER_AUTHOR + 1)
    with pytest.raises(ValueError, match="only 30 facts"):
        build_synthetic_tofu(num_authors=10, num_world_facts=31)


def test_made_up_answers_keep_the_wording_and_change_the_fact(written):
    folder, data = written
    profiles = {p["name"]: p for p in _read(folder / "synthetic_authors.jsonl")}
    for row in _read(folder / "retain90.json")[:6] + _read(folder / "holdout10.json")[:6]:
        made_up = data.made_up_answers(row["question"], 4, seed=5)
        assert made_up == data.made_up_answers(row["question"], 4, seed=5)
        assert len(set(made_up)) == 4 and row["answer"] not in made_up
        name = next(n for n in profiles if n in row["question"])
        # same wording up to the fact: the answer's text before its first differing character
        for answer in made_up:
            common = next(i for i, (a, b) in enumerate(zip(answer, row["answer"])) if a != b)
            assert name in answer and common >= min(len(row["answer"]) // 3, 10)
    with pytest.raises(ValueError, match="not a question"):
        data.made_up_answers("Who wrote the demo?", 2)
