"""Rare technical terms for the vocabulary suite: FOLDOC and GCIDE headwords from the `test`
split that are rare in general English, each with its definition, the key words a right answer
to "What is X?" would use, and held-out sentences from other entries that use the term.

Rarity: wordfreq's Zipf frequency of the headword in English below RARE_ZIPF (2.5, i.e. fewer
than about 3 occurrences per 10 million words; 0 for words wordfreq has never seen). Held-out
sentences come from other `test` entries of the two dictionaries that no glossary holds, so no
condition of the suite has read them."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from . import corpora

RARE_ZIPF = 2.5  # wordfreq.zipf_frequency(term, "en") below this counts as rare
KEYWORD_ZIPF = 5.5  # key words must be less common than this (not "used", "which", ...)
KEYWORDS = 3  # per term: the definition's rarest words
MAX_SENTENCES = 2  # held-out uses per term
DEFINITION_CHARS = 600  # a glossary entry is cut to this length, at a sentence end
_TERM = re.compile(r"[A-Za-z][a-z]{4,}(?:-[a-z]+)?")
_STOP = set(
    """about above after again also among another because been before being below between both
    called certain could does doing down during each either every from further have having here
    into itself just kind made make many more most much must name named often once only other
    over same several should since some such than that their them then there these they this
    those through under until upon used using very what when where which while whose will with
    within without would your
    pertaining relating resembling designating quality state being having species variety
    applied belonging consisting""".split()  # the last line: words of the definitions' form
)


@dataclass
class Term:
    word: str  # as the glossary spells it
    source: str  # "foldoc" or "gcide"
    definition: str  # the cleaned entry, as the glossary holds it
    keywords: list[str]  # any of them in an answer to "What is <word>?" counts as defining it
    sentences: list[str] = field(default_factory=list)  # held-out text that uses the word


@dataclass
class Glossary:
    id: str
    terms: list[Term]

    @property
    def text(self) -> str:
        """The glossary document: one paragraph per term, "Term: definition"."""
        return "\n\n".join(f"{t.word}: {t.definition}" for t in self.terms)


def clean_entry(entry: str, source: str) -> str:
    """An entry's text without its headword line, pronunciation, etymology, dates, sources and
    cross-reference braces, whitespace collapsed."""
    if source == "foldoc":
        text = entry.split("\n\n", 1)[-1]  # the headword lines
        text = re.sub(r"^\s*\(\d{4}-\d\d-\d\d\)\s*$", " ", text, flags=re.MULTILINE)
        text = re.sub(r"<[^>]{1,40}>", " ", text)  # topic tags, <language>
        text = re.sub(r"/[^/\s][^/\n]{0,40}['*][^/\n]{0,40}/", " ", text)  # /pro'nun*ci-a-tion/
    else:
        text = re.sub(r"^[^\\\n]*\\[^\\]*\\,?", " ", entry, count=1)  # headword \pro*nun"ci*a*tion\
        text = re.sub(r"\[[^\w\s\]]{1,2}([A-Za-z])\]", r"\1", text)  # accents, v['e]nerie
        text = re.sub(r"--\s?[A-Z][\w. ]{0,30}\.", " ", text)  # quotation sources, --Shak.
    text = re.sub(r"\[[^\]]{0,600}\]", " ", text)  # etymology, [Obs.], [1913 Webster], sources
    text = re.sub(r"[{}]", "", text)
    return " ".join(text.split())


def _first_sentence(text: str) -> str:
    """The first sense's first sentence, without part of speech and domain labels, (Zool.)."""
    text = re.sub(r"\((?:[A-Z][a-z]*\.\s*)+\)", " ", text).strip()
    text = re.sub(r"^(?:(?:n|v|a|adj|adv|v\. t|v\. i|p\. p|pl|imp)\.\s*,?\s*)+", "", text)
    text = re.sub(r"^1\.\s*", "", text)
    return re.split(r"(?<=[.;])\s", text, maxsplit=1)[0]


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    return text[: end + 1] if end > limit // 3 else text[:limit].rsplit(" ", 1)[0] + " ..."


def keywords_of(definition: str, term: str, zipf) -> list[str]:
    """Up to KEYWORDS words of the definition's first sentence, rarest first: 4+ letters, not a
    stop word, not a form of the term, less common than KEYWORD_ZIPF."""
    words = {w.lower() for w in re.findall(r"[A-Za-z]{4,}", _first_sentence(definition))}
    stem = term.lower()[:5]
    words = [w for w in words if w not in _STOP and not w.startswith(stem)]
    ranked = sorted((zipf(w), w) for w in words)
    return [w for f, w in ranked if f < KEYWORD_ZIPF][:KEYWORDS]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.;!?])\s+", text) if 3 <= len(s.split()) <= 60]


def _zipf():
    try:
        from wordfreq import zipf_frequency
    except ImportError as e:
        raise ImportError("the vocab suite needs wordfreq: pip install 'genadapter[eval]'") from e
    return lambda word: zipf_frequency(word, "en")


def glossaries(n: int, terms_per_glossary: int, seed: int, split: str = "test") -> list[Glossary]:
    """n glossaries of terms_per_glossary rare terms each (FOLDOC and GCIDE alternating), each
    term with at least one held-out sentence; fewer when the split has too few such terms.

    Raises FileNotFoundError when neither dictionary is installed."""
    zipf = _zipf()
    sources = [s for s in ("foldoc", "gcide") if s in corpora.available()]
    if not sources:
        raise FileNotFoundError(
            "the vocab suite needs FOLDOC or GCIDE: apt-get install dict-foldoc dict-gcide"
        )
    texts: list[str] = []  # every entry of the split, cleaned
    queues = []
    for source in sources:
        entries = list(corpora.dictionary_entries(source, split))
        rows = [clean_entry(entry, source) for _, _, entry in entries]
        queues.append(_candidates(entries, rows, len(texts), source, zipf, seed))
        texts += rows
    index: dict[str, set[int]] = {}
    for i, text in enumerate(texts):
        for word in set(re.findall(r"[a-z][a-z-]+", text.lower())):
            index.setdefault(word, set()).add(i)
    wanted = n * terms_per_glossary
    picked: list[tuple[Term, int]] = []  # with the index of its own entry
    seen: set[str] = set()
    while len(picked) < wanted and any(queues):
        for queue in queues:
            while queue and len(picked) < wanted:
                term, own = queue.pop()
                if term.word.lower() in seen:
                    continue
                held = {i for _, i in picked} | {own}
                term.sentences = _uses(term.word, index, texts, held)
                if term.sentences:
                    seen.add(term.word.lower())
                    picked.append((term, own))
                    break
    # An entry picked later may have lent a sentence to an earlier term: take those out.
    held = {i for _, i in picked}
    terms = []
    for term, _ in picked:
        term.sentences = _uses(term.word, index, texts, held)
        if term.sentences:
            terms.append(term)
    k = terms_per_glossary
    groups = [terms[i : i + k] for i in range(0, len(terms) - k + 1, k)]
    return [Glossary(f"glossary-{seed}-{i}", g) for i, g in enumerate(groups)]


def _candidates(entries, cleaned, offset: int, source: str, zipf, seed: int):
    """(Term, index of its entry in the texts) for every rare single-word headword with a
    definition and key words, shuffled by seed (taken from the end)."""
    found = []
    for i, ((_, headwords, entry), text) in enumerate(zip(entries, cleaned)):
        words = [h for h in headwords if _TERM.fullmatch(h)]
        if not words:
            continue
        word = words[0]
        spelled = re.search(rf"\b{re.escape(word)}\b", entry, flags=re.IGNORECASE)
        word = spelled.group(0) if spelled else word
        if zipf(word) >= RARE_ZIPF:
            continue
        definition = _cut(text, DEFINITION_CHARS)
        keys = keywords_of(definition, word, zipf)
        if len(definition.split()) >= 4 and keys:
            found.append((Term(word, source, definition, keys), offset + i))
    random.Random(f"vocab:{seed}:{source}").shuffle(found)
    return found


def _uses(word: str, index: dict, texts: list[str], held: set[int]) -> list[str]:
    """Up to MAX_SENTENCES sentences using `word`, from entries not in `held`, in file order.
    Acronyms and mixed-case names (ZMODEM, VMEbus) must match in case: "parsec" the distance is
    not PARSEC the language."""
    flags = re.IGNORECASE if word[1:].islower() else 0
    pattern = re.compile(rf"\b{re.escape(word)}\b", flags)
    found = []
    for i in sorted(index.get(word.lower(), set()) - held):
        found += [s for s in _sentences(texts[i]) if pattern.search(s)]
        if len(found) >= MAX_SENTENCES:
            break
    return found[:MAX_SENTENCES]
