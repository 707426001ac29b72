"""A small stand-in for the Debian corpora (see tests/data/corpora/README.md): `build(root)` lays
out, under `root`, the files genadapter.eval.corpora and the evaluation harness read, at Debian's
paths.

The prose documents are committed under tests/data/corpora/. The dictionaries (dictd's index +
gzip format) and WordNet's files are generated here from templates and word lists written for the
tests: a dictionary needs many entries before one of its documents (groups of entries of about
6,000 characters, numbered in order) falls in the test split."""

from __future__ import annotations

import gzip
import random
import shutil
from pathlib import Path

from genadapter.eval import corpora

DATA = Path(__file__).parent / "data" / "corpora"
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# -- dictionaries ----------------------------------------------------------------------------------

ONSETS = "b br c cl d dr f fl g gr k l m n p pl qu r s sk st t tr v w z".split()
VOWELS = "a e i o u ai ea io ou".split()
CODAS = "", "", "b", "ck", "l", "m", "n", "nd", "r", "rt", "sk", "st", "x"
KINDS = [
    "programming language", "network protocol", "file format", "text editor", "database",
    "compiler", "operating system", "sorting algorithm", "processor", "mail reader",
]  # fmt: skip
TOPICS = ["programming", "networking", "hardware", "storage", "operating system", "algorithm"]
PURPOSES = [
    "teaching programming to engineers", "controlling laboratory instruments",
    "exchanging mail between universities", "typesetting technical reports",
    "storing weather observations", "scheduling batch jobs overnight",
    "compressing satellite images", "keeping the accounts of small shops",
    "routing packets between campus networks", "checking the spelling of long documents",
]  # fmt: skip
FEATURES = [
    "stores its data in fixed-length records", "compiles to a portable bytecode",
    "runs on most Unix systems of its time", "has no garbage collector",
    "keeps every change in an append-only log", "reads its configuration from a single file",
    "uses a stack machine for evaluation", "was one of the first to support Unicode text",
    "trades memory for speed by caching every result", "needs no operating system at all",
]  # fmt: skip
PLACES = ["the University of Dunmere", "Ostrava Labs", "Kestrel Systems", "Brennock College"]
WORDS_POS = ["n.", "v. t.", "v. i.", "a."]
THINGS = [
    "a small wooden box", "a fishing net", "a kind of bread", "a shallow bay", "a coarse cloth",
    "a dance in triple time", "a river boat", "a garden tool", "a spiced drink", "a roof tile",
]  # fmt: skip
USES = [
    "used by weavers", "common in northern ports", "made from barley", "carried on long journeys",
    "kept near the hearth", "sold at autumn fairs", "found on old farms", "used in churches",
]  # fmt: skip


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(
        rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)
    )


def foldoc_entries(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(headword, entry) pairs in FOLDOC's layout: headword, indented definition, a date."""
    rng = random.Random(f"foldoc:{seed}")
    terms = sorted({_word(rng, rng.randint(2, 3)).capitalize() for _ in range(n * 2)})[:n]
    entries = []
    for i, term in enumerate(terms):
        # The second cross-reference is the next headword, which is most often in the same document
        # and so the same split: the vocab suite finds held-out uses of test-split terms.
        other = [rng.sample(terms, 2)[0], terms[(i + 1) % len(terms)]]
        text = (
            f"<{rng.choice(TOPICS)}> A {rng.choice(KINDS)} developed at {rng.choice(PLACES)} in "
            f"{rng.randint(1962, 1999)} for {rng.choice(PURPOSES)}. {term} "
            f"{rng.choice(FEATURES)}, and it {rng.choice(FEATURES)}. It is now mostly used for "
            f"{rng.choice(PURPOSES)}.\n\n   See also {other[0]}, {other[1]}."
        )
        date = f"({rng.randint(1993, 2012)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d})"
        entries.append((term, f"{term}\n\n   {text}\n\n   {date}\n"))
    return entries


def gcide_entries(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(headword, entry) pairs in GCIDE's layout: headword, pronunciation, part of speech, sense."""
    rng = random.Random(f"gcide:{seed}")
    words = sorted({_word(rng, rng.randint(1, 3)) for _ in range(n * 2)})[:n]
    entries = []
    for word in words:
        pos = rng.choice(WORDS_POS)
        sense = f"{rng.choice(THINGS).capitalize()}, {rng.choice(USES)}."
        sense += f" Also, {rng.choice(THINGS)} {rng.choice(USES)}."
        if rng.random() < 0.5:
            sense += f" [Obs.]\n\n   {rng.choice(THINGS).capitalize()}, {rng.choice(USES)}."
        entries.append((word, f"{word.capitalize()} \\{word}\\, {pos} {sense}\n"))
    return entries


def _b64(n: int) -> str:
    digits = ""
    while True:
        n, d = divmod(n, 64)
        digits = B64[d] + digits
        if n == 0:
            return digits


def write_dictd(folder: Path, name: str, entries: list[tuple[str, str]]) -> None:
    """NAME.index (headword, offset, length in dictd's base64 digits) and NAME.dict.dz (gzip)."""
    body, index = bytearray(), []
    for headword, entry in [("00-database-info", f"Fixture {name} for the tests.\n"), *entries]:
        data = entry.encode()
        index.append(f"{headword}\t{_b64(len(body))}\t{_b64(len(data))}")
        body += data
    (folder / f"{name}.index").write_text("\n".join(sorted(index)) + "\n", encoding="utf-8")
    (folder / f"{name}.dict.dz").write_bytes(gzip.compress(bytes(body), mtime=0))


# -- WordNet ---------------------------------------------------------------------------------------

ANTONYMS = [
    ("hot", "cold"), ("wet", "dry"), ("early", "late"), ("heavy", "light"), ("cheap", "costly"),
    ("narrow", "wide"), ("quiet", "loud"), ("empty", "full"), ("soft", "hard"), ("young", "old"),
    ("clean", "dirty"), ("strong", "weak"), ("thick", "thin"), ("rich", "poor"), ("deep", "low"),
]  # fmt: skip
NOUNS = "table garden window river bread kitchen pencil village blanket ladder".split()
VERBS = "carry listen borrow arrive whisper gather"
IRREGULAR = {
    "went": "go", "ate": "eat", "brought": "bring", "caught": "catch", "taught": "teach",
    "thought": "think", "sought": "seek", "fought": "fight", "took": "take", "came": "come",
    "gave": "give", "drove": "drive", "rode": "ride", "wrote": "write", "spoke": "speak",
    "broke": "break", "froze": "freeze", "stole": "steal", "sang": "sing", "swam": "swim",
    "drank": "drink", "ran": "run", "sat": "sit", "met": "meet", "fell": "fall", "held": "hold",
    "told": "tell", "sold": "sell", "found": "find", "knew": "know", "drew": "draw", "wore": "wear",
    "eaten": "eat",  # shares most of its base: not irregular enough, left out by the harness
}  # fmt: skip
ADVERBS = "quickly often seldom".split()
RARE = {"adj": ["azure"], "noun": ["quern"], "verb": ["wend"]}  # too rarely tagged to be used
# synth_qa's categories (WordNet lexicographer file numbers) and a few nouns of each.
NOUN_FILES = {
    4: "voyage rescue harvest",
    5: "heron otter owl badger wren ferret weasel gannet curlew shrew vole newt toad hare mink "
    "stoat dormouse hedgehog ox hippopotamuses",
    6: "kettle lantern spindle",
    9: "memory insight doubt",
    13: "barley porridge cheese turnip",
    27: "granite basalt copper",
}
LICENSE = (
    "  1 This file was written for the tests of genadapter; it only follows WordNet's layout.\n"
)


def _index_line(lemma: str, pos: str, tagged: int) -> str:
    # lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt synset_offset...
    return f"{lemma} {pos} 1 0 {max(tagged, 1)} {tagged} 00000000"


def write_wordnet(folder: Path) -> None:
    """index.{adj,noun,verb,adv}, data.adj (antonym pointers), data.noun, verb.exc."""
    adjectives = [w for pair in ANTONYMS for w in pair]
    data_adj, offset = [], {w: f"{10000 + 100 * i:08d}" for i, w in enumerate(adjectives)}
    for a, b in ANTONYMS:
        for x, y in ((a, b), (b, a)):
            data_adj.append(f"{offset[x]} 00 a 01 {x} 0 001 ! {offset[y]} a 0101 | not {y}")
    verbs = sorted({*VERBS.split(), *IRREGULAR.values()})
    indices = {
        "adj": [_index_line(w, "a", 5) for w in adjectives] + [_index_line("azure", "a", 1)],
        "noun": [_index_line(w, "n", 4) for w in NOUNS] + [_index_line("quern", "n", 0)],
        "verb": [_index_line(w, "v", 6) for w in verbs] + [_index_line("wend", "v", 2)],
        "adv": [_index_line(w, "r", 3) for w in ADVERBS],
    }
    for suffix, lines in indices.items():
        (folder / f"index.{suffix}").write_text(LICENSE + "\n".join(sorted(lines)) + "\n")
    (folder / "data.adj").write_text(LICENSE + "\n".join(data_adj) + "\n")
    nouns, at = [], 20000
    for lexfile, words in NOUN_FILES.items():
        for word in words.split():
            nouns.append(f"{at:08d} {lexfile:02d} n 01 {word} 0 000 | a {word}")
            at += 100
    nouns.append(f"{at:08d} 05 n 02 Capybara 0 sea_otter 0 000 | names the filter leaves out")
    (folder / "data.noun").write_text(LICENSE + "\n".join(nouns) + "\n")
    (folder / "verb.exc").write_text("".join(f"{f} {b}\n" for f, b in sorted(IRREGULAR.items())))


# -- the whole tree --------------------------------------------------------------------------------


def build(root: Path, foldoc: int = 850, gcide: int = 1000) -> Path:
    """Write the fixture corpora under `root` (Debian's layout); returns `root`."""
    root = Path(root)
    shutil.copytree(DATA / "python-docs", root / corpora.PYTHON_DOCS, dirs_exist_ok=True)
    shutil.copytree(DATA / "debian-reference", root / corpora.DEBIAN_REFERENCE, dirs_exist_ok=True)
    dictd = root / corpora.DICTD
    dictd.mkdir(parents=True, exist_ok=True)
    write_dictd(dictd, "foldoc", foldoc_entries(foldoc))
    write_dictd(dictd, "gcide", gcide_entries(gcide))
    wordnet = root / corpora.WORDNET
    wordnet.mkdir(parents=True, exist_ok=True)
    write_wordnet(wordnet)
    return root
