"""What the library tests share (test_library*.py): five short documents of different kinds, a
question about each, and a library holding them all."""

from genadapter.library.folder import Library

from .conftest import DOCUMENT

DOCS = {
    "rail": DOCUMENT,
    "bees": "Honey bees keep a colony of one queen, thousands of workers and a few hundred drones. "
    "Workers forage for nectar within three kilometres of the hive and dance to tell the others "
    "where flowers are. In winter the colony clusters and shivers to stay warm.",
    "ocean": "The Pacific Ocean is the largest and deepest ocean. The Mariana Trench reaches about "
    "eleven kilometres below sea level, and tides are driven by the Moon.",
    "python": "In Python, a list comprehension builds a list from an iterable: "
    "[x * 2 for x in items if x > 0]. Dictionaries map keys to values and keep insertion order.",
    "tax": "Section 4(b): a taxpayer who files after the deadline owes a penalty of five percent "
    "of the unpaid amount for each month, up to twenty-five percent, unless the delay had a "
    "reasonable cause that the taxpayer documents in writing.",
}
PROMPT = "The Kestrel locomotive was painted"
QUESTIONS = {
    "rail": "When was the line electrified?",
    "bees": "How do workers tell others where the flowers are?",
    "tax": "What is the penalty for filing late?",
    "ocean": "How deep is the Mariana Trench?",
    "python": "How do I build a list from an iterable?",
}


def library_of_docs(model, folder) -> Library:
    """A library at `folder` holding every DOCS entry, added in one process."""
    lib = Library.create(folder, model)
    for name, text in DOCS.items():
        lib.add(name, text)
    return lib
