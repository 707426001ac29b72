"""The vocabulary suite's data and scoring (eval/glossary.py, eval/vocab.py), on hand-written
entries and on the fixture dictionaries (tests/corpus_fixture.py). The suite itself runs through
the runner in test_eval.py's tiny run."""

from __future__ import annotations

from wordfreq import zipf_frequency

from genadapter.eval.glossary import RARE_ZIPF, clean_entry, glossaries, keywords_of
from genadapter.eval.vocab import defines, term_positions

FOLDOC = """pathname
pathspec

   <file system> (Or "path") The specification of a node in a
   hierarchical {file system}.  See {Unix}.

   (1996-01-26)
"""

GCIDE = """Abditory \\Ab"di*to*ry\\, n. [L. abditorium.]
   A place for hiding or preserving articles of value. --Cowell.
   [1913 Webster]"""


def test_clean_entry_keeps_the_definition_only():
    assert clean_entry(FOLDOC, "foldoc") == (
        '(Or "path") The specification of a node in a hierarchical file system. See Unix.'
    )
    assert clean_entry(GCIDE, "gcide") == "n. A place for hiding or preserving articles of value."


def test_keywords_are_the_definitions_rarest_content_words():
    zipf = lambda w: zipf_frequency(w, "en")  # noqa: E731
    definition = "n. (Zool.) A pantheistic eclectic school of philosophy, which Plotinus led."
    keys = keywords_of(definition, "Neoplatonism", zipf)
    # 4+ letters, no stop words ("which"), no label ("Zool"), the three least frequent first.
    assert keys == sorted(keys, key=zipf)[:3] and len(keys) == 3
    assert {"plotinus", "pantheistic", "eclectic"} == set(keys)


def test_defines_matches_key_words_and_their_plurals():
    assert defines("A family of tropical fish.", ["fishes", "freshwater"]) == 1.0
    assert defines("It is a kind of protocols used for files", ["protocol"]) == 1.0
    assert defines("I do not know.", ["protocol", "crash"]) == 0.0
    assert defines("Protocol-based.", ["protocol"]) == 1.0  # punctuation splits words


def test_term_positions_cover_the_terms_tokens(untrained_model):
    tok = untrained_model.tokenizer
    ids, positions = term_positions(tok, "A glossary.\n", "The ZMODEM protocol is fast.", "ZMODEM")
    assert tok.decode([ids[p] for p in positions]).strip() == "ZMODEM"
    ids, positions = term_positions(tok, "", "Pliant reeds bend.", "pliant")  # at the start
    assert positions[0] > 0 and tok.decode([ids[p] for p in positions]).strip() == "Pliant"


def test_glossaries_hold_rare_terms_with_held_out_uses(corpus_root):
    made = glossaries(3, 2, seed=0)
    assert made == glossaries(3, 2, seed=0)
    assert [len(g.terms) for g in made] == [2, 2, 2]
    words = [t.word for g in made for t in g.terms]
    assert len(set(words)) == 6
    texts = "\n".join(g.text for g in made)
    for g in made:
        for t in g.terms:
            assert zipf_frequency(t.word, "en") < RARE_ZIPF
            assert t.definition in g.text and t.keywords
            assert all(k in t.definition.lower() for k in t.keywords)
            for s in t.sentences:  # a use of the term that no glossary holds
                assert t.word.lower() in s.lower() and s not in texts
