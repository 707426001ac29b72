"""Streaming tokenization and input validation with the default model's tokenizer."""

import random

import pytest

from genadapter import text as text_mod
from genadapter.text import DocumentError, chunked, token_stream

from .conftest import DOCUMENT


@pytest.fixture(scope="module")
def tokenizer(model):
    return model.tokenizer


SAMPLES = [
    DOCUMENT,
    "Tabs\tand  double  spaces,\n\n\nblank lines\r\n and unicode: "
    "caf\u00e9, \u4e2d\u6587, \U0001f600!",
    "def f(x):\n    return x  # indented code\n\n\n\tx = 'quoted'  \n",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_split_anywhere_equals_joined_text(tokenizer, text):
    expected = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(6, len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        got = [t for ids in token_stream(tokenizer, pieces) for t in ids]
        assert got == expected


@pytest.mark.parametrize("text", SAMPLES)
def test_long_text_is_tokenized_in_slices_exactly(tokenizer, text, monkeypatch):
    monkeypatch.setattr(text_mod, "SLICE_CHARS", 17)  # force many internal cuts
    long_text = text * 5
    slices = list(token_stream(tokenizer, long_text))
    assert len(slices) > 5
    assert [t for ids in slices for t in ids] == tokenizer.encode(
        long_text, add_special_tokens=False
    )


def test_chunked_regroups_exactly():
    pieces = [[1, 2, 3], [], [4], [5, 6, 7, 8, 9, 10], [11]]
    assert list(chunked(pieces, 4)) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert list(chunked(pieces, 100)) == [list(range(1, 12))]


@pytest.mark.parametrize(
    "document, message",
    [
        ("", "empty"),
        ("  \n\t ", "empty"),
        ([], "empty"),
        (["", " "], "empty"),
        (b"\xff\xfe\x00abc", "UTF-8"),
        ("binary\x00data", "NUL"),
        (12345, "text"),
        (None, "text"),
        (["fine text", 3.5], "text"),
    ],
)
def test_bad_documents_are_rejected(tokenizer, document, message):
    with pytest.raises(DocumentError, match=message):
        list(token_stream(tokenizer, document))


def test_utf8_bytes_are_text(tokenizer):
    text = "caf\u00e9 au lait"
    assert list(token_stream(tokenizer, text.encode())) == list(token_stream(tokenizer, text))
