"""General-knowledge questions asked while an unrelated document is absorbed: absorbing a document
must not make the model forget what it knew (issue 13's "nothing is broken" check).

The questions are this module's own, of other kinds than training's general questions
(training/distill_sources.py), and were kept only where the base model with no context answers
them right under the evaluation's chat template (checked with `candidates()` when the list was
written; the base's own accuracy is measured again on every run). The unrelated document of each
question is a generated QA document of the evaluation (fictional.py)."""

from __future__ import annotations

import random

from .data import Example, Question
from .fictional import qa_examples

# (question, acceptable answers); contains-match, case-insensitive.
QUESTIONS = [
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("What do bees make?", ["honey"]),
    ("How many days are there in a week?", ["seven", "7"]),
    ("What is the boiling point of water in degrees Celsius?", ["100"]),
    ("Who painted the Mona Lisa?", ["Leonardo", "da Vinci"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What is the tallest mountain in the world?", ["Everest"]),
    ("What is the chemical symbol for water?", ["H2O"]),
    ("How many hours are there in a day?", ["24", "twenty-four"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"]),
    ("What is the freezing point of water in degrees Celsius?", ["0", "zero"]),
    ("What is the currency of the United Kingdom?", ["pound"]),
    ("What organ pumps blood through the human body?", ["heart"]),
    ("How many months are there in a year?", ["twelve", "12"]),
    ("Which instrument has black and white keys?", ["piano"]),
    ("What is the largest mammal in the world?", ["whale"]),
    ("What is frozen water called?", ["ice"]),
    ("How many sides does a triangle have?", ["three", "3"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("How many minutes are there in an hour?", ["60", "sixty"]),
    ("What is the largest desert in the world?", ["Sahara", "Antarctic"]),
    ("What colour is chlorophyll?", ["green"]),
    ("What do you call a baby cat?", ["kitten"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("What is the longest river in the world?", ["Nile", "Amazon"]),
    ("Which metal is liquid at room temperature?", ["mercury"]),
    ("In which direction does the Sun rise?", ["east"]),
    ("Which gas do humans need to breathe?", ["oxygen"]),
    ("What is the centre of an atom called?", ["nucleus"]),
    ("Who developed the theory of relativity?", ["Einstein"]),
]


def closedbook_examples(n: int, seed: int) -> list[Example]:
    """Up to n examples, one question each, each with an unrelated generated document."""
    rng = random.Random(f"closedbook:{seed}")
    picked = rng.sample(QUESTIONS, min(n, len(QUESTIONS)))
    documents = qa_examples(len(picked), 1, seed=seed + 77)
    return [
        Example(f"closedbook-{seed}-{i}", doc.documents, [Question(q, answers)])
        for i, ((q, answers), doc) in enumerate(zip(picked, documents))
    ]
