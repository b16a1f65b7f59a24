"""A synthetic fictitious-author data set in the TOFU folder layout, made from a seed.

The offline demo and the tests need unlearning data without the hub, and the project never ships
TOFU itself. This module invents authors (names, birthplaces, birth dates, genres, books, awards,
parents' jobs, ...), asks and answers questions about them, and writes the same JSON Lines files,
with the same field names, that TOFU's folder has, so every loader in the project reads either:

========================================  =====================================================
file                                      rows / fields
========================================  =====================================================
``full.json``                             question, answer: every author of the fine-tuning set
``forgetXX.json`` / ``retainYY.json``     the last / first authors of ``full`` (XX + YY = 100)
``forgetXX_perturbed.json``               + paraphrased_answer, perturbed_answer (list),
                                          paraphrased_question
``retain_perturbed.json``                 the same fields, for the first retain authors
``holdoutXX.json``                        question, answer: authors outside ``full``
``real_authors(_perturbed).json``         multiple choice about well-known writers
``world_facts(_perturbed).json``          multiple choice about world geography
``synthetic_authors.jsonl``               one profile per invented author (for inspection)
========================================  =====================================================

Everything is a pure function of the arguments: the same seed writes byte-identical files.
Perturbed answers keep the paraphrased answer's wording and swap the fact for a wrong one of the
same kind (another city, another date, ...), which is what the truth-ratio metric compares.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Vocabulary pools. Names are built from syllables so that every author is fictitious.

_NAME_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
                "br", "dr", "th", "st"]
_NAME_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ei", "ou"]
_NAME_CODAS = ["", "", "", "n", "r", "l", "s", "m"]
_SURNAME_ENDINGS = ["son", "vik", "ström", "enko", "ard", "ley", "ov", "ini", "wick", "ando",
                    "ier", "berg", "mont", "ara", "quist", "holm"]

_CITIES = [
    ("Lisbon", "Portugal"), ("Porto", "Portugal"), ("Valencia", "Spain"), ("Seville", "Spain"),
    ("Lyon", "France"), ("Marseille", "France"), ("Antwerp", "Belgium"), ("Ghent", "Belgium"),
    ("Utrecht", "the Netherlands"), ("Bergen", "Norway"), ("Tromsø", "Norway"),
    ("Gothenburg", "Sweden"), ("Tampere", "Finland"), ("Aarhus", "Denmark"),
    ("Kraków", "Poland"), ("Gdańsk", "Poland"), ("Brno", "Czechia"), ("Graz", "Austria"),
    ("Ljubljana", "Slovenia"), ("Split", "Croatia"), ("Thessaloniki", "Greece"),
    ("Izmir", "Turkey"), ("Tbilisi", "Georgia"), ("Almaty", "Kazakhstan"),
    ("Pune", "India"), ("Kochi", "India"), ("Chiang Mai", "Thailand"), ("Da Nang", "Vietnam"),
    ("Cebu", "the Philippines"), ("Sapporo", "Japan"), ("Busan", "South Korea"),
    ("Perth", "Australia"), ("Dunedin", "New Zealand"), ("Halifax", "Canada"),
    ("Winnipeg", "Canada"), ("Savannah", "the United States"), ("Tucson", "the United States"),
    ("Oaxaca", "Mexico"), ("Medellín", "Colombia"), ("Cusco", "Peru"),
    ("Valparaíso", "Chile"), ("Rosario", "Argentina"), ("Recife", "Brazil"),
    ("Accra", "Ghana"), ("Mombasa", "Kenya"), ("Durban", "South Africa"),
    ("Marrakesh", "Morocco"), ("Alexandria", "Egypt"),
]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_GENRES = ["mystery", "science fiction", "historical fiction", "fantasy", "romance", "horror",
           "literary fiction", "crime", "adventure", "magical realism", "satire", "poetry",
           "thriller", "travel writing", "children's fiction", "memoir"]
_TITLE_ADJECTIVES = ["Silent", "Crimson", "Hollow", "Distant", "Burning", "Paper", "Glass",
                     "Forgotten", "Northern", "Quiet", "Salt", "Iron", "Winter", "Amber",
                     "Hidden", "Broken", "Velvet", "Drowned", "Golden", "Restless"]
_TITLE_NOUNS = ["Harbour", "Orchard", "Lantern", "Cartographer", "Tide", "Bellfounder",
                "Archive", "Meridian", "Garden", "Lighthouse", "Compass", "Staircase",
                "Observatory", "Ferryman", "Loom", "Meadow", "Clocktower", "Vineyard",
                "Citadel", "Mirror"]
_AWARD_NAMES = ["Amber Quill Prize", "Lantern Award", "Silver Inkwell Medal",
                "Northern Star Book Prize", "Harbour Light Award", "Golden Bookmark Award",
                "Meridian Prize", "Open Page Award", "Saltwater Fiction Prize",
                "Copper Pen Medal", "Willowbrook Award", "Iron Compass Prize"]
_JOBS = ["carpenter", "nurse", "teacher", "baker", "fisherman", "pharmacist", "architect",
         "librarian", "mechanic", "photographer", "tailor", "veterinarian", "electrician",
         "surgeon", "farmer", "journalist", "pilot", "accountant", "chemist", "florist",
         "locksmith", "judge", "dentist", "sculptor"]
_THEMES = ["memory and loss", "exile and return", "family secrets", "the sea",
           "small-town life", "friendship", "ambition", "forgiveness", "the passage of time",
           "identity", "justice", "courage"]

# Well-known writers and their works (public facts; phrased for this project).
_FAMOUS_WORKS = [
    ("Moby-Dick", "Herman Melville"), ("Don Quixote", "Miguel de Cervantes"),
    ("War and Peace", "Leo Tolstoy"), ("Crime and Punishment", "Fyodor Dostoevsky"),
    ("Madame Bovary", "Gustave Flaubert"), ("Great Expectations", "Charles Dickens"),
    ("Emma", "Jane Austen"), ("Jane Eyre", "Charlotte Brontë"),
    ("Wuthering Heights", "Emily Brontë"), ("Middlemarch", "George Eliot"),
    ("The Odyssey", "Homer"), ("Les Misérables", "Victor Hugo"),
    ("The Trial", "Franz Kafka"), ("Ulysses", "James Joyce"),
    ("Mrs Dalloway", "Virginia Woolf"), ("The Old Man and the Sea", "Ernest Hemingway"),
    ("The Great Gatsby", "F. Scott Fitzgerald"), ("Beloved", "Toni Morrison"),
    ("One Hundred Years of Solitude", "Gabriel García Márquez"),
    ("Things Fall Apart", "Chinua Achebe"), ("The Tale of Genji", "Murasaki Shikibu"),
    ("Frankenstein", "Mary Shelley"), ("Dracula", "Bram Stoker"),
    ("Anna Karenina", "Leo Tolstoy"), ("The Divine Comedy", "Dante Alighieri"),
    ("Faust", "Johann Wolfgang von Goethe"), ("Hamlet", "William Shakespeare"),
    ("The Little Prince", "Antoine de Saint-Exupéry"), ("Heart of Darkness", "Joseph Conrad"),
    ("The Stranger", "Albert Camus"),
]
# Countries and their capitals.
_CAPITALS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Poland", "Warsaw"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Morocco", "Rabat"), ("Ghana", "Accra"),
    ("New Zealand", "Wellington"), ("South Korea", "Seoul"),
]


# --------------------------------------------------------------------------------------------
# Authors


@dataclass(frozen=True)
class AuthorProfile:
    """One invented author: every fact the questions ask about."""

    name: str
    birth_city: str
    birth_country: str
    birth_date: str
    genre: str
    first_book: str
    famous_book: str
    award: str
    award_year: int
    father_job: str
    mother_job: str
    home_city: str
    theme: str

    @property
    def birthplace(self) -> str:
        return f"{self.birth_city}, {self.birth_country}"


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _syllable_name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_NAME_ONSETS) + rng.choice(_NAME_VOWELS) + rng.choice(_NAME_CODAS)
             for _ in range(syllables)]
    return "".join(parts).capitalize()


def _person_name(rng: random.Random) -> str:
    first = _syllable_name(rng, 2)
    last = _syllable_name(rng, 1) + rng.choice(_SURNAME_ENDINGS)
    return f"{first} {last}"


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1921, 1995)}"


def _book_title(rng: random.Random) -> str:
    return f"The {rng.choice(_TITLE_ADJECTIVES)} {rng.choice(_TITLE_NOUNS)}"


def make_authors(count: int, seed: int = 0) -> list[AuthorProfile]:
    """``count`` distinct invented authors, the same list for the same ``seed``."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    rng = random.Random(f"altpo-synthetic-authors:{seed}")
    names: set[str] = set()
    titles: set[str] = set()
    authors = []
    while len(authors) < count:
        name = _person_name(rng)
        if name in names:
            continue
        books = []
        while len(books) < 2:
            title = _book_title(rng)
            if title not in titles:
                titles.add(title)
                books.append(title)
        names.add(name)
        city, country = rng.choice(_CITIES)
        father, mother = rng.sample(_JOBS, 2)
        birth_date = _date(rng)
        year = int(birth_date.split()[-1])
        authors.append(AuthorProfile(
            name=name, birth_city=city, birth_country=country, birth_date=birth_date,
            genre=rng.choice(_GENRES), first_book=books[0], famous_book=books[1],
            award=rng.choice(_AWARD_NAMES), award_year=min(max(year, 1960) + rng.randint(25, 30), 2024),
            father_job=father, mother_job=mother,
            home_city=rng.choice([c for c, _ in _CITIES if c != city]),
            theme=rng.choice(_THEMES),
        ))
        if len(titles) > len(_TITLE_ADJECTIVES) * len(_TITLE_NOUNS) - 4:
            raise ValueError(f"too many authors ({count}) for the pool of book titles")
    return authors


# --------------------------------------------------------------------------------------------
# Questions. Each kind of fact has question phrasings (one picked per author), an answer, a
# paraphrased question, a paraphrased answer, and a way to draw wrong values of the same kind.


@dataclass(frozen=True)
class _FactKind:
    key: str
    questions: tuple[str, ...]
    answer: str
    paraphrased_question: str
    paraphrased_answer: str


_FACT_KINDS = [
    _FactKind("birthplace",
              ("Where was {name} born?", "In which city was {name} born?"),
              "{name} was born in {value}.",
              "What is the birthplace of the writer {name}?",
              "The writer {name} comes from {value}."),
    _FactKind("birth_date",
              ("When was {name} born?", "What is the date of birth of {name}?"),
              "{name} was born on {value}.",
              "On what day did {name} come into the world?",
              "The birthday of {name} is {value}."),
    _FactKind("genre",
              ("What genre does {name} write in?", "Which genre is {name} known for?"),
              "{name} is known for writing {value}.",
              "In what literary genre does {name} mostly work?",
              "Most of the work of {name} is {value}."),
    _FactKind("first_book",
              ("What was the first book by {name}?", "Which book did {name} publish first?"),
              "The first book by {name} was \"{value}\".",
              "What was the debut book of {name} called?",
              "{name} made a debut with \"{value}\"."),
    _FactKind("famous_book",
              ("What is the best-known book by {name}?", "Which book made {name} famous?"),
              "The best-known book by {name} is \"{value}\".",
              "Which title by {name} do readers know best?",
              "Readers know {name} best for \"{value}\"."),
    _FactKind("award",
              ("Which award did {name} win?", "What literary prize has {name} received?"),
              "{name} won the {value}.",
              "What honour was given to {name} for writing?",
              "{name} was honoured with the {value}."),
    _FactKind("father_job",
              ("What did the father of {name} do for a living?",
               "What was the profession of the father of {name}?"),
              "The father of {name} worked as {value}.",
              "How did the father of {name} earn a living?",
              "The father of {name} was {value} by trade."),
    _FactKind("mother_job",
              ("What did the mother of {name} do for a living?",
               "What was the profession of the mother of {name}?"),
              "The mother of {name} worked as {value}.",
              "How did the mother of {name} earn a living?",
              "The mother of {name} was {value} by trade."),
    _FactKind("home_city",
              ("Where does {name} live today?", "In which city does {name} live now?"),
              "{name} lives in {value} today.",
              "Which city is home to {name} these days?",
              "These days {name} makes a home in {value}."),
    _FactKind("theme",
              ("What themes does {name} explore?", "What is the main theme in the books of {name}?"),
              "The books of {name} explore {value}.",
              "What subject keeps returning in the writing of {name}?",
              "The writing of {name} keeps returning to {value}."),
]
#: Most questions an author can have.
MAX_QUESTIONS_PER_AUTHOR = len(_FACT_KINDS)


def _fact_value(author: AuthorProfile, key: str) -> str:
    if key == "birthplace":
        return author.birthplace
    if key == "award":
        return f"{author.award} in {author.award_year}"
    if key in ("father_job", "mother_job"):
        job = getattr(author, key)
        return f"{_article(job)} {job}"
    return getattr(author, key)


def _wrong_values(rng: random.Random, author: AuthorProfile, key: str, count: int) -> list[str]:
    """``count`` distinct values of the same kind as ``key`` that are all wrong for ``author``."""
    truth = _fact_value(author, key)
    out: list[str] = []
    for _ in range(1000):
        if key == "birthplace":
            city, country = rng.choice(_CITIES)
            value = f"{city}, {country}"
        elif key == "birth_date":
            value = _date(rng)
        elif key == "genre":
            value = rng.choice(_GENRES)
        elif key in ("first_book", "famous_book"):
            value = _book_title(rng)
        elif key == "award":
            value = f"{rng.choice(_AWARD_NAMES)} in {min(author.award_year + rng.randint(-6, 6), 2024)}"
        elif key in ("father_job", "mother_job"):
            job = rng.choice(_JOBS)
            value = f"{_article(job)} {job}"
        elif key == "home_city":
            value = rng.choice(_CITIES)[0]
        else:
            value = rng.choice(_THEMES)
        if value != truth and value not in out:
            out.append(value)
            if len(out) == count:
                return out
    raise ValueError(f"could not draw {count} distinct wrong values for {key!r}")


def author_rows(author: AuthorProfile, questions_per_author: int, num_perturbed: int,
                rng: random.Random) -> list[dict]:
    """The perturbed-layout rows (question, answer, paraphrases, wrong answers) for one author."""
    rows = []
    for kind in _FACT_KINDS[:questions_per_author]:
        value = _fact_value(author, kind.key)
        fmt = dict(name=author.name)
        wrong = _wrong_values(rng, author, kind.key, num_perturbed)
        rows.append({
            "question": rng.choice(kind.questions).format(**fmt),
            "answer": kind.answer.format(value=value, **fmt),
            "paraphrased_answer": kind.paraphrased_answer.format(value=value, **fmt),
            "perturbed_answer": [kind.paraphrased_answer.format(value=w, **fmt) for w in wrong],
            "paraphrased_question": kind.paraphrased_question.format(**fmt),
        })
    return rows


def _multiple_choice(rng: random.Random, items: list[tuple[str, str]], count: int,
                     question: str) -> tuple[list[dict], list[dict]]:
    """Rows of a four-option multiple-choice split and of its ``_perturbed`` twin."""
    if count > len(items):
        raise ValueError(f"asked for {count} rows but only {len(items)} facts are available")
    picked = rng.sample(items, count)
    answers = sorted({answer for _, answer in items})
    plain, perturbed = [], []
    for subject, answer in picked:
        wrong = rng.sample([a for a in answers if a != answer], 3)
        options = wrong[:]
        options.insert(rng.randrange(4), answer)
        q = question.format(subject=subject)
        plain.append({"question": q, **{f"option{i + 1}": o for i, o in enumerate(options)},
                      "answer": answer})
        perturbed.append({"question": q, "answer": answer, "perturbed_answer": wrong})
    return plain, perturbed


# --------------------------------------------------------------------------------------------
# The data set


@dataclass
class SyntheticTofu:
    """Every split of one synthetic data set, by TOFU file stem (``"forget10"``, ...)."""

    splits: dict[str, list[dict]]
    authors: list[AuthorProfile]
    holdout_authors: list[AuthorProfile]
    forget_percents: tuple[int, ...]
    questions_per_author: int

    def made_up_answers(self, question: str, count: int, seed: int = 0) -> list[str]:
        """``count`` answers to an author ``question`` in its answer's wording, each with a
        different wrong fact of the right kind (another city, another date, ...).

        These are what an instruction-following model writes when asked to answer with changed
        facts; the demo teaches that skill to its tiny model on retain authors.
        """
        found = None
        for author in self.authors + self.holdout_authors:
            for kind in _FACT_KINDS[:self.questions_per_author]:
                if question in (q.format(name=author.name) for q in kind.questions):
                    found = author, kind
        if found is None:
            raise ValueError(f"not a question of this data set: {question!r}")
        author, kind = found
        rng = random.Random(f"altpo-synthetic-made-up:{seed}:{question}")
        return [kind.answer.format(value=v, name=author.name)
                for v in _wrong_values(rng, author, kind.key, count)]

    def write(self, folder: str | Path) -> Path:
        """Write every split as JSON Lines ``<stem>.json`` (and the profiles) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for stem, rows in self.splits.items():
            _write_jsonl(folder / f"{stem}.json", rows)
        _write_jsonl(folder / "synthetic_authors.jsonl",
                     [asdict(a) | {"split": "full"} for a in self.authors]
                     + [asdict(a) | {"split": "holdout"} for a in self.holdout_authors])
        return folder


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def valid_forget_percents(num_authors: int) -> tuple[int, ...]:
    """TOFU's forget sizes (1, 5, 10 %) that are a whole number of authors out of ``num_authors``."""
    return tuple(p for p in (1, 5, 10) if (num_authors * p) % 100 == 0)


def build_synthetic_tofu(num_authors: int = 40, questions_per_author: int = 10, *,
                         forget_percents: tuple[int, ...] | None = None, num_perturbed: int = 5,
                         num_real_authors: int = 20, num_world_facts: int = 20,
                         seed: int = 0) -> SyntheticTofu:
    """Invent a TOFU-shaped data set in memory.

    Args:
        num_authors: authors in ``full`` (the fine-tuning set); the forget authors are its last
            ones, as in TOFU. Holdout authors (as many as the largest forget split) come on top.
        questions_per_author: 1 to :data:`MAX_QUESTIONS_PER_AUTHOR` questions per author.
        forget_percents: forget split sizes in percent of ``num_authors`` (each must be a whole
            number of authors, at most 50 %); default: those of 1, 5, 10 that are.
        num_perturbed: wrong answers per forget / retain question (TOFU has 5).
        num_real_authors, num_world_facts: rows of the two general-knowledge multiple-choice
            splits (at most 30 each).
        seed: everything is a function of this.
    """
    if not 1 <= questions_per_author <= MAX_QUESTIONS_PER_AUTHOR:
        raise ValueError(f"questions_per_author must be 1..{MAX_QUESTIONS_PER_AUTHOR}, "
                         f"got {questions_per_author}")
    if num_perturbed < 1:
        raise ValueError(f"num_perturbed must be at least 1, got {num_perturbed}")
    if forget_percents is None:
        forget_percents = valid_forget_percents(num_authors)
        if not forget_percents:
            raise ValueError(f"num_authors={num_authors} gives no whole-author forget split of "
                             "1, 5 or 10 %; use a multiple of 10 authors")
    forget_percents = tuple(sorted(set(int(p) for p in forget_percents)))
    for p in forget_percents:
        if not 0 < p <= 50 or (num_authors * p) % 100:
            raise ValueError(f"forget percent {p} is not a whole number of authors out of "
                             f"{num_authors} (or is outside 1..50)")
    counts = {p: num_authors * p // 100 for p in forget_percents}
    most = max(counts.values())

    everyone = make_authors(num_authors + most, seed)
    authors, holdout_authors = everyone[:num_authors], everyone[num_authors:]
    rng = random.Random(f"altpo-synthetic-questions:{seed}")
    per_author = [author_rows(a, questions_per_author, num_perturbed, rng) for a in everyone]
    qa = lambda rows: [{"question": r["question"], "answer": r["answer"]} for r in rows]  # noqa: E731

    def rows_of(start: int, stop: int) -> list[dict]:
        return [row for block in per_author[start:stop] for row in block]

    splits: dict[str, list[dict]] = {"full": qa(rows_of(0, num_authors))}
    for p, k in counts.items():
        splits[f"forget{p:02d}"] = qa(rows_of(num_authors - k, num_authors))
        splits[f"retain{100 - p:02d}"] = qa(rows_of(0, num_authors - k))
        splits[f"forget{p:02d}_perturbed"] = rows_of(num_authors - k, num_authors)
        splits[f"holdout{p:02d}"] = qa(rows_of(num_authors, num_authors + k))
    # As in TOFU: the first authors of full, as many as the largest forget split, never forgotten.
    splits["retain_perturbed"] = rows_of(0, most)

    mc_rng = random.Random(f"altpo-synthetic-general:{seed}")
    ra, ra_p = _multiple_choice(mc_rng, _FAMOUS_WORKS, num_real_authors,
                                "Which writer is the author of \"{subject}\"?")
    wf, wf_p = _multiple_choice(mc_rng, _CAPITALS, num_world_facts,
                                "What city is the capital of {subject}?")
    splits.update(real_authors=ra, real_authors_perturbed=ra_p,
                  world_facts=wf, world_facts_perturbed=wf_p)
    return SyntheticTofu(splits, authors, holdout_authors, forget_percents, questions_per_author)


def write_synthetic_tofu(folder: str | Path, **kwargs) -> SyntheticTofu:
    """:func:`build_synthetic_tofu` (same keyword arguments), written into ``folder``."""
    data = build_synthetic_tofu(**kwargs)
    data.write(folder)
    return data
