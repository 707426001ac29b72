"""Readers for the real English text that installs from Debian's packages here (see
training/DATA.md), and the one rule that splits documents into train / dev / test.

Every document has a stable id ("python-docs:library/os", "foldoc:0042", ...). Training uses only
`split_of(id) == "train"`; evaluation uses "test"; periodic evaluation during training uses "dev".

The packages' files are read under the file-system root `/`, or under $GENADAPTER_CORPUS_ROOT when
it is set: a folder laid out like `/` (the tests point it at a small fixture tree).
"""

from __future__ import annotations

import gzip
import hashlib
import html
import os
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

ROOT_ENV = "GENADAPTER_CORPUS_ROOT"
# Where Debian installs each corpus, relative to the root (see path()).
PYTHON_DOCS = Path("usr/share/doc/python3.11/html/_sources")
DICTD = Path("usr/share/dictd")
DEBIAN_REFERENCE = Path("usr/share/doc/debian-reference-en/docs")
WORDNET = Path("usr/share/wordnet")  # read by eval/demonstrations.py and training/synth_qa.py

# Dictionary entries are short; consecutive entries are grouped into documents of about this size.
DICT_DOC_CHARS = 6000

CORPORA = ("python-docs", "foldoc", "gcide", "debian-reference")
APT_PACKAGES = {
    "python-docs": "python3-doc",
    "foldoc": "dict-foldoc",
    "gcide": "dict-gcide",
    "debian-reference": "debian-reference-en",
}


def split_of(doc_id: str) -> str:
    """'test' (5%), 'dev' (5%) or 'train' (90%), fixed by a hash of the document id."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:4], "big") % 20
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


def root() -> Path:
    """The folder the corpora are read under: $GENADAPTER_CORPUS_ROOT, or `/`."""
    return Path(os.environ.get(ROOT_ENV) or "/")


def path(relative: Path) -> Path:
    """Where one of the paths above is on this machine (under root())."""
    return root() / relative


def available() -> list[str]:
    """The corpora whose files are present under root(), in CORPORA's order."""
    paths = {
        "python-docs": PYTHON_DOCS,
        "foldoc": DICTD / "foldoc.index",
        "gcide": DICTD / "gcide.index",
        "debian-reference": DEBIAN_REFERENCE,
    }
    return [name for name in CORPORA if path(paths[name]).exists()]


def documents(corpus: str, split: str | None = None) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of one corpus, in a fixed order; only one split when given."""
    readers = {
        "python-docs": _python_docs,
        "foldoc": lambda: _dictionary("foldoc"),
        "gcide": lambda: _dictionary("gcide"),
        "debian-reference": _debian_reference,
    }
    if corpus not in readers:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    if corpus not in available():
        raise FileNotFoundError(
            f"corpus {corpus!r} is not installed: apt-get install {APT_PACKAGES[corpus]}"
        )
    for doc_id, text in readers[corpus]():
        if split is None or split_of(doc_id) == split:
            yield doc_id, text


def _python_docs() -> Iterator[tuple[str, str]]:
    folder = path(PYTHON_DOCS)
    for file in sorted(folder.rglob("*.rst.txt")):
        text = file.read_text(encoding="utf-8", errors="replace")
        name = file.relative_to(folder).as_posix().removesuffix(".rst.txt")
        if text.strip():
            yield f"python-docs:{name}", text


def _b64(s: str) -> int:
    """dictd index numbers: base64 digits, most significant first."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for ch in s:
        n = n * 64 + alphabet.index(ch)
    return n


def _dictionary(name: str) -> Iterator[tuple[str, str]]:
    for doc_id, entries in _dictionary_groups(name):
        yield doc_id, "\n\n".join(entry for _, entry in entries)


def dictionary_entries(name: str, split: str | None = None) -> Iterator[tuple[str, list[str], str]]:
    """(doc_id, headwords, entry) of every entry of the dictionary `name` ("foldoc" or "gcide"),
    in file order. doc_id is the document (group of entries) the entry belongs to in
    `documents(name)`, so an entry is in its document's split; only one split when given.
    headwords: the index's names for the entry (several for one entry, e.g. a spelling variant)."""
    if name not in ("foldoc", "gcide"):
        raise ValueError(f"{name!r} is not a dictionary; use 'foldoc' or 'gcide'")
    if name not in available():
        raise FileNotFoundError(
            f"corpus {name!r} is not installed: apt-get install {APT_PACKAGES[name]}"
        )
    for doc_id, entries in _dictionary_groups(name):
        if split is None or split_of(doc_id) == split:
            for headwords, entry in entries:
                yield doc_id, headwords, entry


def _dictionary_groups(name: str) -> Iterator[tuple[str, list[tuple[list[str], str]]]]:
    """Consecutive entries grouped into documents of about DICT_DOC_CHARS characters."""
    body = gzip.decompress(path(DICTD / f"{name}.dict.dz").read_bytes())
    spans: dict[tuple[int, int], list[str]] = {}
    for line in path(DICTD / f"{name}.index").read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-database"):
            spans.setdefault((_b64(parts[1]), _b64(parts[2])), []).append(parts[0])
    group, size, number = [], 0, 0
    for (offset, length), headwords in sorted(spans.items()):
        entry = body[offset : offset + length].decode("utf-8", errors="replace").strip()
        group.append((headwords, entry))
        size += len(entry)
        if size >= DICT_DOC_CHARS:
            yield f"{name}:{number:05d}", group
            group, size, number = [], 0, number + 1
    if group:
        yield f"{name}:{number:05d}", group


class _TextOfHTML(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")
        if tag in ("p", "div", "br", "li", "h1", "h2", "h3", "h4", "pre", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style") and self.skip > 0

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def _debian_reference() -> Iterator[tuple[str, str]]:
    for file in sorted(path(DEBIAN_REFERENCE).glob("*.en.html")):
        parser = _TextOfHTML()
        parser.feed(file.read_text(encoding="utf-8", errors="replace"))
        text = re.sub(r"\n\s*\n+", "\n\n", html.unescape("".join(parser.parts))).strip()
        # A chapter is long: split at blank lines into documents of a few thousand characters.
        for i, part in enumerate(_paragraph_groups(text, 8000)):
            yield f"debian-reference:{file.name.split('.')[0]}:{i:03d}", part


def _paragraph_groups(text: str, max_chars: int) -> Iterator[str]:
    group, size = [], 0
    for para in text.split("\n\n"):
        group.append(para)
        size += len(para)
        if size >= max_chars:
            yield "\n\n".join(group)
            group, size = [], 0
    if group:
        yield "\n\n".join(group)
