"""Text in: validate documents and turn a stream of text pieces into fixed-size token chunks
without ever holding more than one chunk batch of tokens."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

# Tokenize in slices of this many characters so a huge string never becomes one huge token list.
SLICE_CHARS = 1 << 16


class DocumentError(ValueError):
    """A document that cannot be absorbed: empty, not text, or not valid UTF-8."""


def as_text(piece: object) -> str:
    if isinstance(piece, (bytes, bytearray, memoryview)):
        try:
            piece = bytes(piece).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DocumentError(
                f"document is not valid UTF-8 text ({e.reason} at {e.start})"
            ) from e
    if not isinstance(piece, str):
        raise DocumentError(
            f"document must be text (str or UTF-8 bytes), got {type(piece).__name__}"
        )
    if "\x00" in piece:
        raise DocumentError("document contains NUL bytes; it looks like binary data, not text")
    return piece


def pieces_of(document: object) -> Iterator[str]:
    """A str/bytes document is one piece; any other iterable yields its pieces."""
    if isinstance(document, (str, bytes, bytearray, memoryview)):
        yield as_text(document)
        return
    if not isinstance(document, Iterable):
        raise DocumentError(
            f"document must be text or an iterable of text, got {type(document).__name__}"
        )
    for piece in document:
        yield as_text(piece)


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
