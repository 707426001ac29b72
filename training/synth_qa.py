"""Synthetic instruction-tuning data: short documents about invented entities, a question about
one fact, and its short answer. Everything is made up from syllables and templates with a seed, so
the answer can only come from the absorbed document. Its templates are this module's own, apart
from the evaluation harness's QA suite."""

from __future__ import annotations

import random
from dataclasses import dataclass

SYLLABLES = "ka lo mir dan ve tor sel ba rin gu ost fel na quo tre lim har cas vel or pen".split()
COLOURS = "amber crimson teal ochre violet silver indigo olive scarlet ivory".split()
MATERIALS = "granite cedar copper basalt marble oak limestone bronze slate glass".split()
TRADES = "clockmaking glassblowing cartography beekeeping weaving shipbuilding printing".split()
ANIMALS = "heron otter lynx falcon badger marten kestrel stoat plover ibex".split()


def name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


@dataclass
class Example:
    document: str
    question: str
    answer: str


def _town(rng):
    town = name(rng, 3)
    facts = {
        "founded": str(rng.randint(1200, 1950)),
        "founder": f"{name(rng)} {name(rng)}",
        "river": f"the {name(rng)} River",
        "population": f"{rng.randint(2, 90)},{rng.randint(100, 999)}",
        "trade": rng.choice(TRADES),
        "animal": rng.choice(ANIMALS),
        "colour": rng.choice(COLOURS),
    }
    sentences = [
        (
            f"{town} was founded in {facts['founded']} by {facts['founder']}.",
            f"In which year was {town} founded?",
            facts["founded"],
        ),
        (
            f"The town lies on the banks of {facts['river']}.",
            f"On which river does {town} lie?",
            facts["river"],
        ),
        (
            f"Today about {facts['population']} people live in {town}.",
            f"How many people live in {town}?",
            facts["population"],
        ),
        (
            f"For centuries its people have been known for {facts['trade']}.",
            f"What craft is {town} known for?",
            facts["trade"],
        ),
        (
            f"The {facts['animal']} appears on the town's {facts['colour']} flag.",
            f"Which animal appears on the flag of {town}?",
            facts["animal"],
        ),
        (
            f"Who founded {town}? It was {facts['founder']}, a travelling merchant.",
            f"Who founded {town}?",
            facts["founder"],
        ),
    ]
    return sentences


def _person(rng):
    who = f"{name(rng)} {name(rng, 3)}"
    facts = {
        "born": str(rng.randint(1700, 1990)),
        "city": name(rng, 3),
        "work": rng.choice(TRADES),
        "material": rng.choice(MATERIALS),
        "prize": f"the {name(rng)} Medal",
        "pet": rng.choice(ANIMALS),
    }
    return [
        (
            f"{who} was born in {facts['born']} in the city of {facts['city']}.",
            f"Where was {who} born?",
            facts["city"],
        ),
        (
            f"{who.split()[0]} spent a long career in {facts['work']}.",
            f"What was {who}'s profession?",
            facts["work"],
        ),
        (
            f"Their best-known piece was made of {facts['material']}.",
            f"What material was {who}'s best-known piece made of?",
            facts["material"],
        ),
        (
            f"In later life {who.split()[0]} received {facts['prize']}.",
            f"Which award did {who} receive?",
            facts["prize"],
        ),
        (
            f"Friends remember a pet {facts['pet']} that followed them everywhere.",
            f"What kind of pet did {who} keep?",
            facts["pet"],
        ),
        (
            f"Records give {facts['born']} as the year of {who.split()[0]}'s birth.",
            f"In which year was {who} born?",
            facts["born"],
        ),
    ]


def make_example(rng: random.Random, distractors: int = 2) -> Example:
    """One entity's facts among distractor entities' facts; a question about the first."""
    makers = [_town, _person]
    entities = [rng.choice(makers)(rng) for _ in range(1 + distractors)]
    target = entities[0]
    sentence, question, answer = rng.choice(target)
    paragraphs = []
    for facts in entities:
        chosen = [s for s, _, _ in facts]
        rng.shuffle(chosen)
        paragraphs.append(" ".join(chosen))
    rng.shuffle(paragraphs)
    assert sentence in " ".join(paragraphs)
    return Example("\n\n".join(paragraphs), question, answer)
