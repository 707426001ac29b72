"""Streaming tokenization, input validation and incremental detokenization with the default
model's tokenizer."""

import random

import pytest

from genadapter import text as text_mod
from genadapter.text import Detokenizer, DocumentError, chunked, token_stream

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
        (b"caf\xc3", "ends in the middle of a character"),
        ([b"caf\xc3", b"\xa9", b" au lait \xe2\x98"], "ends in the middle of a character"),
        ([b"caf\xc3", b"( au lait"], "invalid continuation byte at byte 3"),
        ([b"caf\xc3", "\xa9 au lait"], "str piece follows bytes"),
        ("caf\udce9", "surrogate"),
        ([b"caf\xc3\xa9", "\ud83d"], "surrogate"),
    ],
)
def test_bad_documents_are_rejected(tokenizer, document, message):
    with pytest.raises(DocumentError, match=message):
        list(token_stream(tokenizer, document))


def test_utf8_bytes_are_text(tokenizer):
    text = "caf\u00e9 au lait"
    assert list(token_stream(tokenizer, text.encode())) == list(token_stream(tokenizer, text))


def flat(token_pieces):
    return [t for ids in token_pieces for t in ids]


def test_utf8_character_split_across_byte_pieces(tokenizer):
    expected = tokenizer.encode("caf\u00e9 au lait", add_special_tokens=False)
    assert flat(token_stream(tokenizer, [b"caf\xc3", b"\xa9 au lait"])) == expected
    assert flat(token_stream(tokenizer, iter([b"caf\xc3", bytearray(b"\xa9 au"), b" lait"]))) == (
        expected
    )


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_pieces_split_anywhere_equal_joined_text(tokenizer, text):
    data = text.encode()
    expected = tokenizer.encode(text, add_special_tokens=False)
    assert flat(token_stream(tokenizer, [data[i : i + 1] for i in range(len(data))])) == expected
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), k=6))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        assert flat(token_stream(tokenizer, pieces)) == expected


def test_str_and_bytes_pieces_mix_at_character_boundaries(tokenizer):
    expected = tokenizer.encode("caf\u00e9 au lait \u4e2d\u6587", add_special_tokens=False)
    pieces = ["caf", b"\xc3\xa9 au", " lait ", b"\xe4\xb8", b"\xad\xe6\x96\x87"]
    assert flat(token_stream(tokenizer, pieces)) == expected


# -- text out --------------------------------------------------------------------------------

MULTIBYTE = "caf\u00e9 \u4e2d\u6587 \u2605\u2605 \U0001f600\U0001f600 done"


def detokenized(tokenizer, ids):
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids]
    return "".join(pieces) + detok.finish()


def test_detokenizer_never_shows_an_incomplete_character(tokenizer):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    cut_inside = 0
    for k in range(len(ids) + 1):
        text = detokenized(tokenizer, ids[:k])
        assert "\ufffd" not in text
        assert MULTIBYTE.startswith(text)
        # The longest prefix of the text whose bytes the k tokens hold in full.
        complete = tokenizer.decode(ids[:k])
        cut_inside += complete.endswith("\ufffd")
        assert text == complete.removesuffix("\ufffd")
    assert cut_inside >= 4  # the sample really splits characters across tokens
    assert detokenized(tokenizer, ids) == MULTIBYTE


def test_detokenizer_drops_invalid_bytes_but_keeps_a_generated_replacement_character(tokenizer):
    smile = tokenizer.encode("\U0001f600", add_special_tokens=False)
    assert len(smile) == 3  # four bytes in three tokens
    word = tokenizer.encode(" word", add_special_tokens=False)
    # The first bytes of a character, then a token that does not continue it.
    assert detokenized(tokenizer, smile[:2] + word) == " word"
    replacement = tokenizer.encode(" \ufffd", add_special_tokens=False)
    assert detokenized(tokenizer, word + replacement) == " word \ufffd"


def test_detokenizer_equals_decode_on_complete_text(tokenizer):
    rng = random.Random(3)
    special = tokenizer.all_special_ids
    for text in [*SAMPLES, MULTIBYTE]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for _ in range(5):  # special tokens are skipped, as decode(skip_special_tokens=True) does
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        assert detokenized(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)
