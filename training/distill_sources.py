"""Where distillation examples come from: a document and a user message about it.

Training sources draw only on training data (training/DATA.md). `evalstyle` draws from the
evaluation's own QA generator with seeds that are neither the test nor the dev split's, and is
used for held-out measurement only, never for training.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_qa import make_example, name  # noqa: E402

from genadapter.eval.fictional import qa_examples  # noqa: E402
from genadapter.eval.runner import QA_INSTRUCTION  # noqa: E402

# How users ask for a short answer; the evaluation's own wording is deliberately not among them.
INSTRUCTIONS = ["", "", "Be brief.", "Reply with just the answer.", "Keep it short.", "Briefly:"]
EVAL_SEEDS_EXCLUDED = {0, 1_000_003}  # genadapter eval's test and dev seeds


@dataclass
class Item:
    document: str
    message: str
    answers: list[str] = field(default_factory=list)


def synth(rng: random.Random) -> Item:
    ex = make_example(rng, distractors=rng.randint(0, 3))
    extra = rng.choice(INSTRUCTIONS)
    return Item(ex.document, f"{ex.question} {extra}".strip(), [ex.answer])


def evalstyle(rng: random.Random) -> Item:
    while (seed := rng.randrange(1, 2**31)) in EVAL_SEEDS_EXCLUDED:
        pass
    example = qa_examples(1, 1, seed=seed)[0]
    q = example.questions[0]
    return Item(example.context, f"{q.text} {QA_INSTRUCTION}", list(q.answers))


# -- a user's facts stated in past conversations (this module's own templates) --------------------

MY_FACTS = [
    ("My favourite colour is {colour}.", "What is my favourite colour?", "colour"),
    ("I drive an old {car}.", "What car do I drive?", "car"),
    ("I was born in {place}.", "Where was I born?", "place"),
    ("My daughter is called {name}.", "What is my daughter called?", "name"),
    ("My best friend {name} lives next door.", "Who is my best friend?", "name"),
    ("I play the {instrument} in a small band.", "Which instrument do I play?", "instrument"),
    ("I teach {subject} at the local school.", "What subject do I teach?", "subject"),
    ("Every morning I drink {drink}.", "What do I drink every morning?", "drink"),
    ("My cat is named {name}.", "What is my cat's name?", "name"),
    ("I'm saving up for a trip to {place}.", "Where am I saving up to travel?", "place"),
    ("I collect {thing}.", "What do I collect?", "thing"),
    ("My birthday is in {month}.", "In which month is my birthday?", "month"),
    ("My surname is {name}.", "What is my surname?", "name"),
]
FILL = {
    "colour": "teal|mustard|lilac|burgundy|olive|coral|navy|saffron".split("|"),
    "car": "Volvo|Fiat|Saab|Skoda|Renault|Toyota|Peugeot|Lada".split("|"),
    "instrument": "trombone|ukulele|oboe|mandolin|drums|clarinet|viola|harmonica".split("|"),
    "subject": "history|chemistry|geography|French|biology|art|physics|music".split("|"),
    "drink": "green tea|black coffee|hot chocolate|lemon water|chai|espresso".split("|"),
    "thing": "stamps|old maps|seashells|vinyl records|pocket watches|postcards".split("|"),
    "month": "January|March|April|June|July|September|November|December".split("|"),
}
CHAT = [
    ("Can you suggest a quick lunch?", "A wrap with hummus and vegetables takes five minutes."),
    ("How do I stop my glasses fogging up?", "A drop of dish soap rubbed on the lenses helps."),
    ("Is it better to run in the morning?", "Whenever you can keep it up regularly is best."),
    ("What's a nice houseplant for shade?", "A snake plant or a pothos copes well with shade."),
    ("How many cups of water a day?", "Around six to eight, more when it is hot."),
]


def persona(rng: random.Random) -> Item:
    """A conversation (speaker turns) in which the user mentions facts about themselves."""
    facts = rng.sample(MY_FACTS, rng.randint(3, 6))
    lines, values = [], []
    for template, _, kind in facts:
        value = name(rng) if kind == "name" else name(rng, 3) if kind == "place" else None
        values.append(value or rng.choice(FILL[kind]))
        said = template.format(**{kind: values[-1]})
        lines.append((said, rng.choice(["Good to know!", "Thanks for telling me.", "Noted."])))
    for ask in rng.sample(CHAT, rng.randint(1, 2)):
        lines.insert(rng.randrange(len(lines) + 1), ask)
    user, bot = rng.choice([("User", "Assistant"), ("Me", "You"), ("Human", "AI")])
    document = "\n".join(f"{user}: {a}\n{bot}: {b}" for a, b in lines)
    asked = rng.randrange(len(facts))  # the same draw as rng.choice(facts)
    question = facts[asked][1]
    return Item(document, f"{question} {rng.choice(INSTRUCTIONS)}".strip(), [values[asked]])


# -- general questions with an unrelated document absorbed ----------------------------------------

COUNTRIES = (
    "France Germany Italy Spain Japan Egypt Canada Mexico Russia China India Brazil Kenya "
    "Norway Greece Portugal Ireland Peru Chile Australia Sweden Poland Turkey Argentina"
).split()
GENERAL = [
    "What is the capital of {country}?",
    "What language do people speak in {country}?",
    "On which continent is {country}?",
    "What is {a} plus {b}?",
    "What is {a} times {b}?",
    "What is the opposite of {word}?",
    "What colour is {thing}?",
    "How many legs does a {animal} have?",
    "What sound does a {animal} make?",
    "What is the plural of {noun}?",
]
WORDS = "hot tall early happy full light open fast young strong".split()
THINGS = "the sky|grass|snow|a banana|coal|a ripe tomato|milk|the sea".split("|")
ANIMALS_ = "dog|cat|spider|bird|cow|horse|duck|ant|sheep|frog".split("|")
NOUNS = "mouse|child|box|leaf|tooth|city|knife|goose|foot|man".split("|")


def general(rng: random.Random) -> Item:
    """A general question while an unrelated synthetic document is absorbed: the teacher (with
    that document in its prompt) still answers from what it knows, and so must the student."""
    question = rng.choice(GENERAL).format(
        country=rng.choice(COUNTRIES),
        a=rng.randint(2, 12),
        b=rng.randint(2, 12),
        word=rng.choice(WORDS),
        thing=rng.choice(THINGS),
        animal=rng.choice(ANIMALS_),
        noun=rng.choice(NOUNS),
    )
    document = rng.choice([synth, persona])(rng).document
    return Item(document, f"{question} {rng.choice(INSTRUCTIONS)}".strip())


def mixed(rng: random.Random) -> Item:
    """The training mix: document QA, a user's facts, and general questions."""
    return rng.choices([synth, persona, general], weights=[0.55, 0.25, 0.2])[0](rng)


SOURCES = {
    "synth": synth,
    "persona": persona,
    "general": general,
    "mixed": mixed,
    "evalstyle": evalstyle,
}
