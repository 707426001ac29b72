"""Synthetic instruction-tuning data: short documents about invented entities, a question about
one fact, and its short answer. Everything is made up from syllables and templates with a seed, so
the answer can only come from the absorbed document. Its entity kinds, templates and syllables are
this module's own, apart from the evaluation harness's QA suite (genadapter/eval/fictional.py:
companies, expeditions, scientists), so evaluation measures reading, not a memorised template."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from genadapter.eval import corpora

# Names are random syllables from a large space, so no answer can be guessed from what training
# saw before: the only way to lower the loss is to read the absorbed document. (A first version
# drew from 21 fixed syllables, and the generator learned to answer with plausible made-up names
# from them instead of copying.)
ONSETS = "b c ch d f g h j k l m n p qu r s sh t v w y z bl cr fl gl pl sl sn sp str tw".split()
NUCLEI = "a e i o u y ai au ea ee oa oo ui".split()
CODAS = ["", "", "", "", "", "b", "ck", "ff", "g", "ll", "mp", "nt", "p", "ss", "st", "t", "ng"]
COLOURS = "amber crimson teal ochre violet silver indigo olive scarlet ivory".split()
MATERIALS = "granite cedar copper basalt marble oak limestone bronze slate glass".split()
TRADES = "clockmaking glassblowing cartography beekeeping weaving shipbuilding printing".split()
ANIMALS = "heron otter lynx falcon badger marten kestrel stoat plover ibex".split()
MONTHS = "January February March April May June July August September October".split()
FOODS = "plum cake|smoked eel|barley soup|honey bread|pickled herring|chestnut pie".split("|")
CARGO = "salt|timber|tea|coal|wool|grain|spices|marble".split("|")
INSTRUMENTS = "fiddle|harp|accordion|bagpipes|cello|flute|banjo|trumpet".split("|")
SUBJECTS = "music|mathematics|carpentry|navigation|medicine|law|painting|farming".split("|")
FILLER = [
    "Not everyone agrees on every detail of this account.",
    "Much of this was written down long after the fact.",
    "The surrounding hills are covered in heather for most of the year.",
    "Travellers rarely stayed longer than a night or two.",
    "Some of these stories are told differently by older residents.",
    "A short guide to the area mentions this only in passing.",
    "The weather there changes quickly in the afternoon.",
    "There is a small museum nearby with a few related objects.",
]
# WordNet lexicographer files (noun.animal, noun.food, ...) whose nouns fill a slot of that kind.
CATEGORIES = {"act": 4, "animal": 5, "artifact": 6, "cognition": 9, "food": 13, "substance": 27}


def wordnet_nouns() -> Path:
    """WordNet's noun synsets (Debian's wordnet package), under genadapter.eval.corpora's root."""
    return corpora.path(corpora.WORDNET / "data.noun")


@cache
def category_words(category: str) -> tuple[str, ...]:
    """Plain lower-case WordNet nouns of 3-10 letters of one kind (1,500-7,000 of each), or ()
    without WordNet. An answer drawn from them is of the kind the question asks for, which the
    base model can recognise in the document, but too rare to be guessed."""
    synsets = wordnet_nouns()
    if not synsets.is_file():
        return ()
    words = set()
    for line in synsets.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()  # offset, lexicographer file, type, word count (hex), words...
        if line.startswith(" ") or len(fields) < 5 or int(fields[1]) != CATEGORIES[category]:
            continue
        for lemma in fields[4 : 4 + 2 * int(fields[3], 16) : 2]:
            if lemma.isalpha() and lemma.islower() and 3 <= len(lemma) <= 10:
                words.add(lemma)
    return tuple(sorted(words))


def pick(rng: random.Random, closed: list[str], category: str) -> str:
    """Mostly a WordNet noun of the slot's kind, sometimes one from its closed list."""
    vocabulary = category_words(category)
    return rng.choice(vocabulary) if vocabulary and rng.random() < 0.7 else rng.choice(closed)


ASK_SUFFIXES = ["", "", "", " Reply with just the answer.", " Be brief.", " Keep it short."]


def name(rng: random.Random, parts: int = 2) -> str:
    parts = max(1, parts + rng.choice((-1, 0)))
    syllables = (rng.choice(ONSETS) + rng.choice(NUCLEI) + rng.choice(CODAS) for _ in range(parts))
    return "".join(syllables).capitalize()


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def person(rng: random.Random) -> str:
    return f"{name(rng)} {name(rng, 3)}"


@dataclass
class Example:
    document: str
    question: str
    answer: str


# Each maker returns [(sentence, question, answer)]; the first sentence introduces the entity.


def _town(rng):
    town = name(rng, 3)
    founded, founder = str(rng.randint(1200, 1950)), person(rng)
    river, population = f"the {name(rng)} River", f"{rng.randint(2, 90)},{rng.randint(100, 999)}"
    trade, animal, colour = (
        pick(rng, TRADES, "act"),
        pick(rng, ANIMALS, "animal"),
        rng.choice(COLOURS),
    )
    return [
        (f"{town} was founded in {founded}.", f"In which year was {town} founded?", founded),
        (f"The town lies on the banks of {river}.", f"On which river does {town} lie?", river),
        (
            f"Today about {population} people live in {town}.",
            f"How many people live in {town}?",
            population,
        ),
        (
            f"For centuries its people have been known for {trade}.",
            f"What craft is {town} known for?",
            trade,
        ),
        (
            f"The {animal} appears on the town's {colour} flag.",
            f"Which animal appears on the flag of {town}?",
            animal,
        ),
        (
            f"The first settlers were led by {founder}, a travelling merchant.",
            f"Who founded {town}?",
            founder,
        ),
    ]


def _person(rng):
    who = person(rng)
    first = who.split()[0]
    born, city, work = str(rng.randint(1700, 1990)), name(rng, 3), pick(rng, TRADES, "act")
    material, prize, pet = (
        pick(rng, MATERIALS, "substance"),
        f"the {name(rng)} Medal",
        pick(rng, ANIMALS, "animal"),
    )
    return [
        (
            f"{who} was born in {born} in the city of {city}.",
            f"Where was {who} born?",
            city,
        ),
        (f"{first} spent a long career in {work}.", f"What was {who}'s profession?", work),
        (
            f"Their best-known piece was made of {material}.",
            f"What material was {who}'s best-known piece made of?",
            material,
        ),
        (f"In later life {first} received {prize}.", f"Which award did {who} receive?", prize),
        (
            f"Friends remember a pet {pet} that followed them everywhere.",
            f"What kind of pet did {who} keep?",
            pet,
        ),
        (
            f"Records give {born} as the year of {first}'s birth.",
            f"In which year was {who} born?",
            born,
        ),
    ]


def _ship(rng):
    ship = f"the {name(rng)}"
    captain, port, launched = person(rng), name(rng, 3), str(rng.randint(1600, 1930))
    cargo, wreck, crew = (
        pick(rng, CARGO, "substance"),
        name(rng, 2) + " Reef",
        str(rng.randint(12, 300)),
    )
    return [
        (
            f"{_upper_first(ship)} was a merchant ship launched in {launched}.",
            f"When was {ship} launched?",
            launched,
        ),
        (f"Her home port was {port}.", f"What was the home port of {ship}?", port),
        (
            f"She was commanded for most of her life by {captain}.",
            f"Who was the captain of {ship}?",
            captain,
        ),
        (f"She mostly carried {cargo}.", f"What cargo did {ship} mostly carry?", cargo),
        (f"A crew of {crew} sailed aboard her.", f"How large was the crew of {ship}?", crew),
        (f"In the end she ran aground on {wreck}.", f"Where did {ship} run aground?", wreck),
    ]


def _festival(rng):
    fest = f"the {name(rng)} Festival"
    town, month, food = name(rng, 3), rng.choice(MONTHS), pick(rng, FOODS, "food")
    organiser, colour, days = person(rng), rng.choice(COLOURS), str(rng.randint(2, 12))
    return [
        (
            f"{_upper_first(fest)} is held every year in {town}.",
            f"Where is {fest} held?",
            town,
        ),
        (f"It takes place in {month}.", f"In which month does {fest} take place?", month),
        (f"It lasts {days} days.", f"How many days does {fest} last?", days),
        (
            f"The traditional dish served there is {food}.",
            f"What dish is served at {fest}?",
            food,
        ),
        (
            f"Visitors wear {colour} ribbons on the last evening.",
            f"What colour ribbons do visitors wear at {fest}?",
            colour,
        ),
        (
            f"These days it is run by {organiser}.",
            f"Who runs {fest}?",
            organiser,
        ),
    ]


def _musician(rng):
    who = person(rng)
    first = who.split()[0]
    instrument, band, teacher = (
        pick(rng, INSTRUMENTS, "artifact"),
        f"the {name(rng)} Players",
        person(rng),
    )
    album, home = name(rng, 3), name(rng, 3)
    return [
        (f"{who} is a musician from {home}.", f"Where is {who} from?", home),
        (f"{first} plays the {instrument}.", f"Which instrument does {who} play?", instrument),
        (
            f"For ten years {first} toured with {band}.",
            f"Which group did {who} tour with?",
            band,
        ),
        (
            f"{first} first learned to play from {teacher}.",
            f"Who taught {who} to play?",
            teacher,
        ),
        (
            f"Their most famous record is called {album}.",
            f"What is {who}'s most famous record called?",
            album,
        ),
    ]


def _school(rng):
    school = f"{name(rng, 3)} College"
    head, subject, pupils = (
        person(rng),
        pick(rng, SUBJECTS, "cognition"),
        str(rng.randint(80, 1500)),
    )
    opened, mascot, town = str(rng.randint(1500, 1990)), pick(rng, ANIMALS, "animal"), name(rng, 3)
    return [
        (f"{school} is a school in {town}.", f"In which town is {school}?", town),
        (f"It opened in {opened}.", f"When did {school} open?", opened),
        (f"It is best known for teaching {subject}.", f"What is {school} known for?", subject),
        (f"Its head teacher is {head}.", f"Who is the head teacher of {school}?", head),
        (f"About {pupils} pupils study there.", f"How many pupils study at {school}?", pupils),
        (f"The school mascot is a {mascot}.", f"What is the mascot of {school}?", mascot),
    ]


MAKERS = [_town, _person, _ship, _festival, _musician, _school]


def make_example(rng: random.Random, distractors: int = 2) -> Example:
    """One entity's facts among distractor entities' facts and filler; a question about the
    first entity. Sentences keep the introducing one first; the rest come in random order."""
    entities = [rng.choice(MAKERS)(rng) for _ in range(1 + distractors)]
    target = entities[0]
    sentence, question, answer = rng.choice(target)
    paragraphs = []
    for facts in entities:
        chosen = [s for s, _, _ in facts]
        head, rest = chosen[0], chosen[1:]
        rng.shuffle(rest)
        if rng.random() < 0.5:
            rest.insert(rng.randrange(len(rest) + 1), rng.choice(FILLER))
        paragraphs.append(" ".join([head, *rest]))
    rng.shuffle(paragraphs)
    assert sentence in " ".join(paragraphs)
    return Example("\n\n".join(paragraphs), question + rng.choice(ASK_SUFFIXES), answer)
