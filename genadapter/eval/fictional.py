"""Documents about invented entities, with short-answer questions, built from templates and a seed.

Everything is made up (names from random syllables, facts drawn at random), so a right answer can
only come from the context. The templates, entity kinds and syllables are this module's own and
differ from the training data's synthetic QA (training/synth_qa.py), so evaluation measures reading,
not recall of a training template."""

from __future__ import annotations

import random
from collections.abc import Callable

from .data import Example, Question

ONSETS = "b br d dr f g gr h k kl l m n p pr s sk st t th tr v w z".split()
VOWELS = "a e i o u ae ei ou ia".split()
CODAS = ["", "", "", "n", "r", "l", "s", "th", "x", "nd", "rk", "m"]
PLACE_ENDINGS = "wick mere holm stead ford haven cliff moor dale port".split()
FIRMS = "Lampworks Ropewalk Instruments Weaving Mill Tileworks Press Foundry Bellworks".split()
PRODUCTS = [
    "brass telescopes",
    "wool blankets",
    "paper lanterns",
    "clockwork toys",
    "ceramic tiles",
    "canvas sails",
    "copper kettles",
    "leather saddles",
    "church bells",
    "glass buoys",
]
EMBLEMS = "salamander hare owl stag swan crane wolf tortoise beetle seahorse".split()
DISCOVERIES = [
    "a new species of fern",
    "the ruins of a stone harbour",
    "a hot spring",
    "a colony of white seals",
    "an iron meteorite",
    "a buried bronze bell",
    "a cave of blue crystals",
]
FIELDS = "astronomy botany geology chemistry acoustics metallurgy cartography".split()
INSTRUMENTS = [
    "a mirror telescope",
    "a tide gauge",
    "a seismograph",
    "a rain gauge",
    "a pendulum clock",
    "a spectroscope",
]
FILLER = [
    "Records from that period are incomplete, and some details remain uncertain.",
    "Visitors often remark on how quiet the surrounding countryside is.",
    "Several letters from the time survive in a regional archive.",
    "The winters in that part of the country are long and wet.",
    "Local newspapers reported on these events only briefly.",
    "A small plaque now marks the spot.",
    "Historians still debate how much of the early story is legend.",
    "The roads in the area were poor until well into the last century.",
    "A later fire destroyed part of the written record.",
    "Many of the original buildings still stand today.",
    "The story is retold every year at a small gathering.",
    "Few photographs from those years have survived.",
]


class NameMaker:
    """Invented names, never the same one twice within one maker."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def _unique(self, make: Callable[[], str]) -> str:
        while True:
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name

    def word(self, syllables: int = 2) -> str:
        r = self.rng
        return "".join(
            r.choice(ONSETS) + r.choice(VOWELS) + r.choice(CODAS) for _ in range(syllables)
        )

    def person(self) -> str:
        return self._unique(lambda: f"{self.word(2).title()} {self.word(2).title()}")

    def place(self) -> str:
        return self._unique(lambda: self.word(2).title() + self.rng.choice(PLACE_ENDINGS))

    def firm(self) -> str:
        return self._unique(lambda: f"{self.word(2).title()} {self.rng.choice(FIRMS)}")

    def vessel(self) -> str:
        return self._unique(lambda: self.word(2).title())


# Each fact: (sentence phrasings, question, acceptable answers). The first sentence introduces.
Fact = tuple[list[str], str, list[str]]


def _company(names: NameMaker, r: random.Random) -> tuple[str, list[Fact]]:
    firm, founder, town = names.firm(), names.person(), names.place()
    year, product, staff = r.randint(1780, 1960), r.choice(PRODUCTS), r.randint(40, 2000)
    emblem = r.choice(EMBLEMS)
    return firm, [
        (
            [f"{firm} is a company based in the town of {town}."],
            f"In which town is {firm} based?",
            [town],
        ),
        (
            [f"It was founded in {year}.", f"The company opened its doors in {year}."],
            f"In which year was {firm} founded?",
            [str(year)],
        ),
        (
            [f"Its founder was {founder}.", f"{founder} started the business."],
            f"Who founded {firm}?",
            [founder, founder.split()[1]],
        ),
        (
            [f"{firm} is best known for its {product}.", f"Its main product is {product}."],
            f"What does {firm} make?",
            [product],
        ),
        (
            [f"About {staff} people work for the company.", f"It employs around {staff} people."],
            f"How many people work for {firm}?",
            [str(staff)],
        ),
        (
            [f"A {emblem} appears on the company's emblem.", f"Its emblem shows a {emblem}."],
            f"Which animal is on the emblem of {firm}?",
            [emblem],
        ),
    ]


def _expedition(names: NameMaker, r: random.Random) -> tuple[str, list[Fact]]:
    title = f"the {names.word(2).title()} Expedition"
    leader, island, ship = names.person(), f"the island of {names.place()}", names.vessel()
    year, crew, months = r.randint(1700, 1930), r.randint(6, 90), r.randint(2, 30)
    found = r.choice(DISCOVERIES)
    name = title[0].upper() + title[1:]
    return name, [
        (
            [f"{name} set out for {island} in {year}."],
            f"In which year did {title} set out?",
            [str(year)],
        ),
        (
            [f"It was led by {leader}.", f"Its leader was {leader}."],
            f"Who led {title}?",
            [leader, leader.split()[1]],
        ),
        (
            [f"The expedition sailed on a ship called the {ship}.", f"Its ship was the {ship}."],
            f"What was the name of the ship of {title}?",
            [ship],
        ),
        (
            [f"There were {crew} people in the crew.", f"A crew of {crew} made the journey."],
            f"How many people were in the crew of {title}?",
            [str(crew)],
        ),
        (
            [f"On the island they found {found}.", f"Their best-known find was {found}."],
            f"What did {title} find?",
            [found],
        ),
        (
            [f"The journey took {months} months.", f"They were away for {months} months."],
            f"How many months did {title} last?",
            [str(months)],
        ),
    ]


def _scientist(names: NameMaker, r: random.Random) -> tuple[str, list[Fact]]:
    who, town, college = names.person(), names.place(), f"the University of {names.place()}"
    year, field, tool = r.randint(1750, 1960), r.choice(FIELDS), r.choice(INSTRUMENTS)
    medal = f"the {names.word(2).title()} Medal"
    return who, [
        (
            [f"{who} was a scientist born in {year}."],
            f"In which year was {who} born?",
            [str(year)],
        ),
        (
            [f"{who} grew up in {town}.", f"The family lived in {town}."],
            f"Where did {who} grow up?",
            [town],
        ),
        (
            [f"{who} worked mainly in {field}.", f"Most of the work was in {field}."],
            f"What field did {who} work in?",
            [field],
        ),
        (
            [f"{who} built {tool}.", f"Among other things, {who} constructed {tool}."],
            f"What instrument did {who} build?",
            [tool],
        ),
        (
            [f"For many years {who} taught at {college}.", f"{who} held a post at {college}."],
            f"At which university did {who} teach?",
            [college, college.split()[-1]],
        ),
        (
            [f"{who} was awarded {medal}.", f"The highest honour received was {medal}."],
            f"Which medal did {who} receive?",
            [medal, medal.split()[1]],
        ),
    ]


KINDS = (_company, _expedition, _scientist)


def entity_document(names: NameMaker, r: random.Random) -> tuple[str, list[Question]]:
    """One document (intro first, other facts and some filler in random order) and a question for
    each of its facts."""
    name, facts = r.choice(KINDS)(names, r)
    intro, rest = facts[0], facts[1:]
    sentences = [r.choice(s) for s, _, _ in rest] + r.sample(FILLER, r.randint(2, 4))
    r.shuffle(sentences)
    text = " ".join([intro[0][0], *sentences])
    questions = [Question(q, answers, info={"entity": name}) for _, q, answers in facts]
    return text, questions


def qa_examples(n: int, questions_per_document: int, seed: int) -> list[Example]:
    """n one-document examples, each with a few of its questions."""
    r = random.Random(f"qa:{seed}")
    names = NameMaker(r)
    examples = []
    for i in range(n):
        text, questions = entity_document(names, r)
        picked = r.sample(questions, min(questions_per_document, len(questions)))
        examples.append(Example(f"qa-{seed}-{i}", [text], picked))
    return examples


def long_example(
    total_tokens: int, questions: int, seed: int, count_tokens: Callable[[str], int]
) -> Example:
    """A stream of entity documents of about total_tokens tokens, with questions each about one
    document at a random place in the stream. info records how many tokens follow the answer's
    document: prompting truncated to the window keeps only the most recent text."""
    r = random.Random(f"longqa:{seed}:{total_tokens}")
    names = NameMaker(r)
    documents, all_questions, sizes = [], [], []
    while sum(sizes) < total_tokens:
        text, qs = entity_document(names, r)
        documents.append(text)
        all_questions.append(qs)
        sizes.append(count_tokens(text) + 2)  # + the blank line that joins documents
    picked = []
    for index in sorted(r.sample(range(len(documents)), min(questions, len(documents)))):
        q = r.choice(all_questions[index])
        q.info.update(document=index, tokens_after=sum(sizes[index + 1 :]))
        picked.append(q)
    return Example(f"longqa-{seed}-{total_tokens}", documents, picked)
