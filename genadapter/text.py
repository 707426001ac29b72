"""Text in and out, as UTF-8 streams.

In: validate documents and turn a stream of text (or UTF-8 byte) pieces into fixed-size token
chunks without ever holding more than one chunk batch of tokens. Out: turn generated token ids
into text incrementally, never showing a character that the tokens did not complete."""

from __future__ import annotations

import codecs
import re
import weakref
from collections.abc import Iterable, Iterator

# Tokenize in slices of this many characters so a huge string never becomes one huge token list.
SLICE_CHARS = 1 << 16
# Surrogate code points: a str holding one cannot be encoded as UTF-8 (nor tokenized).
_SURROGATE = re.compile("[\ud800-\udfff]")


class DocumentError(ValueError):
    """A document that cannot be absorbed: empty, not text, or not valid UTF-8."""


def _checked(text: str) -> str:
    if "\x00" in text:
        raise DocumentError("document contains NUL bytes; it looks like binary data, not text")
    if not text.isascii() and (bad := _SURROGATE.search(text)):
        raise DocumentError(
            f"document is not valid Unicode text: lone surrogate U+{ord(bad[0]):04X} "
            "(a str that no UTF-8 text decodes to)"
        )
    return text


class _Utf8Stream:
    """Decodes bytes pieces as one UTF-8 stream: a character may be split across pieces.

    Byte offsets in errors count from the start of the document's bytes."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._fed = 0  # bytes fed so far

    @property
    def pending(self) -> bytes:
        """Bytes of a character begun but not yet completed."""
        return self._decoder.getstate()[0]

    def decode(self, data: bytes, final: bool = False) -> str:
        start = self._fed - len(self.pending)  # document offset of the decoder's buffer
        self._fed += len(data)
        try:
            return self._decoder.decode(data, final)
        except UnicodeDecodeError as e:
            at = start + e.start
            if final and e.reason == "unexpected end of data":
                raise DocumentError(
                    f"document is not valid UTF-8 text: it ends in the middle of a character "
                    f"(byte {at} begins an incomplete sequence)"
                ) from e
            raise DocumentError(
                f"document is not valid UTF-8 text ({e.reason} at byte {at})"
            ) from e


def pieces_of(document: object) -> Iterator[str]:
    """The text pieces of one document.

    `document` is str or UTF-8 bytes (one piece), or an iterable of str and bytes-like pieces. The
    document is the UTF-8 concatenation of its pieces: bytes pieces are decoded as one stream, so
    a character may be split across them (b"caf\xc3", b"\xa9" is "café"). str and bytes pieces
    may be mixed, but a str piece cannot continue a character that a bytes piece began.

    Raises DocumentError for anything that is not text: another type, invalid UTF-8 (also a
    stream that ends in the middle of a character), or NUL bytes."""
    if isinstance(document, str):
        yield _checked(document)
        return
    if isinstance(document, (bytes, bytearray, memoryview)):
        document = [document]
    elif not isinstance(document, Iterable):
        raise DocumentError(
            f"document must be text or an iterable of text, got {type(document).__name__}"
        )
    utf8 = _Utf8Stream()
    for piece in document:
        if isinstance(piece, (bytes, bytearray, memoryview)):
            yield _checked(utf8.decode(bytes(piece)))
        elif isinstance(piece, str):
            if utf8.pending:
                raise DocumentError(
                    "document is not valid UTF-8 text: a str piece follows bytes that end in the "
                    f"middle of a character ({utf8.pending!r})"
                )
            yield _checked(piece)
        else:
            raise DocumentError(
                f"document must be text (str or UTF-8 bytes), got {type(piece).__name__}"
            )
    yield _checked(utf8.decode(b"", final=True))


def _safe_cut(text: str) -> int:
    """Index of the start of the last whitespace run that follows a non-space character.

    Byte-level BPE pre-tokenizers never join a non-space character with the whitespace after it,
    so tokenizing text[:cut] and text[cut:] separately gives the tokens of the whole text."""
    i = len(text)
    while i > 0 and not text[i - 1].isspace():
        i -= 1
    while i > 0 and text[i - 1].isspace():
        i -= 1
    return i


def token_stream(tokenizer, document: object) -> Iterator[list[int]]:
    """Token ids of a document arriving in pieces, yielded in pieces; the concatenation equals the
    tokens of the joined text. Raises DocumentError for empty or non-text input."""
    buffer = ""
    seen_text = False
    for piece in pieces_of(document):
        seen_text = seen_text or not piece.isspace() and piece != ""
        buffer += piece
        while len(buffer) > SLICE_CHARS:
            cut = _safe_cut(buffer[: SLICE_CHARS * 2])
            if cut == 0:  # no whitespace at all in a long stretch: cut anyway
                cut = SLICE_CHARS
            yield tokenizer.encode(buffer[:cut], add_special_tokens=False)
            buffer = buffer[cut:]
    if not seen_text:
        raise DocumentError("document is empty")
    if buffer:
        yield tokenizer.encode(buffer, add_special_tokens=False)


def chunked(token_pieces: Iterable[list[int]], chunk_tokens: int) -> Iterator[list[int]]:
    """Regroup token pieces into chunks of exactly chunk_tokens (the last one may be shorter)."""
    pending: list[int] = []
    for ids in token_pieces:
        pending.extend(ids)
        while len(pending) >= chunk_tokens:
            yield pending[:chunk_tokens]
            pending = pending[chunk_tokens:]
    if pending:
        yield pending


# -- text out --------------------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme), inverted: printable
    Latin-1 bytes stand for themselves; the other 68 bytes, in order, for U+0100 onwards."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return alphabet


_ALPHABET = _byte_level_alphabet()
_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_bytes(tokenizer) -> dict[int, bytes] | None:
    """A per-tokenizer cache of token id -> the bytes it decodes to, when the tokenizer decodes
    byte-level tokens by concatenating their bytes (GPT-2, Llama 3, Qwen2, SmolLM2); None when it
    transforms text in other ways (SentencePiece, space clean-up)."""
    if tokenizer in _TOKEN_BYTES:
        return _TOKEN_BYTES[tokenizer]
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = type(decoder).__name__ == "ByteLevel"
    table = {} if byte_level and not tokenizer.clean_up_tokenization_spaces else None
    if table is not None:  # decode(skip_special_tokens=True) drops these: they decode to nothing
        specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        table.update(dict.fromkeys([*specials, *tokenizer.all_special_ids], b""))
    _TOKEN_BYTES[tokenizer] = table
    return table


class Detokenizer:
    """Token ids to text, one token at a time, as `tokenizer.decode(ids, skip_special_tokens=True)`
    would show them, except that the text never holds a character no token produced: an
    incomplete UTF-8 sequence is held back until a later token completes it, and dropped when no
    token does (finish()); with byte-level tokenizers invalid byte sequences are dropped too
    instead of becoming U+FFFD. The pieces add() and finish() return, joined, are the text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._bytes = _token_bytes(tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._ids: list[int] = []  # tokens so far (only without a byte table)
        self._shown = 0  # characters of decode(ids) returned so far (only without a byte table)

    def add(self, token: int) -> str:
        """The text that `token` completes (often "", e.g. for the first bytes of a character)."""
        if self._bytes is None:
            self._ids.append(token)
            text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # maybe an incomplete character: wait for more tokens
                return ""
            new, self._shown = text[self._shown :], len(text)
            return new
        return self._utf8.decode(self._of(token))

    def finish(self) -> str:
        """The text still held back, without a trailing incomplete character."""
        if self._bytes is None:
            text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            # Without bytes, a trailing U+FFFD cannot be told from an incomplete character.
            new, self._shown = text[self._shown :].rstrip("\ufffd"), len(text)
            return new
        return self._utf8.decode(b"", final=True)

    def _of(self, token: int) -> bytes:
        data = self._bytes.get(token)
        if data is None:
            (piece,) = self.tokenizer.convert_ids_to_tokens([token])
            try:
                data = bytes(_ALPHABET[c] for c in piece)
            except KeyError:  # not in the byte alphabet (an added token): its text as is
                data = piece.encode("utf-8")
            self._bytes[token] = data
        return data
