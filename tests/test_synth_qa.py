"""The synthetic instruction-tuning QA (training/synth_qa.py): answerable, seeded, and its WordNet
words of the kind each question asks for."""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import synth_qa  # noqa: E402


def test_every_answer_is_in_its_document_and_draws_are_seeded():
    for seed in range(300):
        ex = synth_qa.make_example(random.Random(seed), distractors=seed % 3)
        assert ex.answer and ex.answer in ex.document, ex
        assert "?" in ex.question
        assert ex == synth_qa.make_example(random.Random(seed), distractors=seed % 3)


def test_category_words_are_of_their_kind(corpus_root):
    # The session's WordNet is the fixture's (tests/corpus_fixture.py): a few nouns of each kind.
    assert synth_qa.wordnet_nouns().is_relative_to(corpus_root)
    animals, foods = synth_qa.category_words("animal"), synth_qa.category_words("food")
    assert {"heron", "otter", "owl", "hedgehog"} <= set(animals) and "granite" not in animals
    assert "granite" in synth_qa.category_words("substance") and "owl" not in foods
    # Only plain lower-case words of 3-10 letters: no "ox", "hippopotamuses", "Capybara" or
    # "sea_otter".
    assert not {"ox", "hippopotamuses", "Capybara", "sea_otter"} & set(animals)
    assert len(animals) == 18 and "barley" in foods
    # The flag's animal is a WordNet animal most of the time, from the closed list otherwise.
    drawn = [synth_qa._town(random.Random(i))[4][2] for i in range(200)]
    assert all(a in animals or a in synth_qa.ANIMALS for a in drawn)
    assert 0.5 < sum(a not in synth_qa.ANIMALS for a in drawn) / len(drawn) < 0.9
