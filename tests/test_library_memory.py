"""Library entries' context memories (genadapter/library/memory.py): written with each entry, read
by a routed turn as its session reads them, absent from old entries."""

import json

import pytest
import torch

from genadapter.library.folder import MANIFEST, Library
from genadapter.state import CorruptStateError

from .library_kit import DOCS, QUESTIONS, library_of_docs


@pytest.fixture(scope="module")
def built(random_model, tmp_path_factory):
    """A library holding every DOCS entry, added in one process."""
    return library_of_docs(random_model, tmp_path_factory.mktemp("lib") / "all")


MEMORY_FIELDS = ("keys", "values", "key_scale", "value_scale", "lexical_ids", "lexical_weights")


def _assert_same_memory(got, want):
    """Two ContextMemory objects hold the same chunks, bit for bit."""
    for field in ("storage", "prefix_len", "documents"):
        assert getattr(got, field) == getattr(want, field), field
    assert len(got.chunks) == len(want.chunks) > 0
    for a, b in zip(got.chunks, want.chunks):
        assert (a.document, a.offset) == (b.document, b.offset)
        for field in MEMORY_FIELDS:
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), field


def test_an_entrys_memory_round_trips_bit_exactly(random_model, built, tmp_path):
    # The entry's memory is the one a session absorbing the document keeps (the same pass).
    session = random_model.session()
    session.absorb(DOCS["rail"])
    stored, _ = built.load("rail")
    _assert_same_memory(stored.memory, session.memory)
    assert stored.memory.storage == "int8" and stored.memory.documents == 1
    (rail,) = [e for e in built.list() if e.name == "rail"]
    assert (rail.memory_tokens, rail.memory_bytes) == (session.memory_tokens, session.memory_bytes)
    # An entry of two files: one memory of two documents, as a session absorbing both keeps.
    for name in ("ocean", "bees"):
        (tmp_path / f"{name}.txt").write_text(DOCS[name])
    lib = Library.create(tmp_path / "two", random_model)
    lib.add("two", [tmp_path / "ocean.txt", tmp_path / "bees.txt"])
    both = random_model.session()
    both.absorb(DOCS["ocean"])
    both.absorb(DOCS["bees"])
    loaded, _ = lib.load("two")
    _assert_same_memory(loaded.memory, both.memory)
    assert loaded.memory.documents == 2 and {c.document for c in loaded.memory.chunks} == {0, 1}
    # Merged into another library, the entry keeps its memory.
    merged = Library.create(tmp_path / "merged", random_model)
    assert merged.merge(lib) == ["two"]
    _assert_same_memory(merged.load("two")[0].memory, both.memory)
    assert merged.list()[0].memory_tokens == both.memory_tokens > 0


def test_a_one_entry_routed_turn_reads_memory_like_its_session(random_model, tmp_path):
    lib = Library.create(tmp_path / "one", random_model)
    lib.add("tax", DOCS["tax"])
    session = random_model.session()
    session.absorb(DOCS["tax"])
    question = QUESTIONS["tax"]
    messages = [{"role": "user", "content": question}]
    want = session.chat_layout(messages, 8)
    got = lib.session(k=2).chat_layout(messages, 8)
    assert want.read is not None and want.read.tokens == session.memory_tokens
    assert (got.header, got.rest, got.read.chunks) == (want.header, want.rest, want.read.chunks)
    assert torch.equal(got.read.keys, want.read.keys)
    assert torch.equal(got.read.values, want.read.values)
    # The same answer: the same memory read, under the entry's one routed state.
    assert lib.session(k=2).chat(question, max_new_tokens=4) == session.chat(
        question, max_new_tokens=4
    )
    # Raw text reads it too (the prompt is the turn's text).
    ids = random_model.tokenizer.encode(question, add_special_tokens=False)
    raw = lib.session(k=2).text_layout(ids, question)
    assert raw.read is not None
    assert torch.equal(raw.read.keys, session.text_layout(ids, question).read.keys)
    # Without memory the routed session reads none.
    assert lib.session(k=2, memory=False).chat_layout(messages, 8).read is None


def test_an_entry_written_without_memory_loads_with_an_empty_one(random_model, tmp_path):
    lib = Library.create(tmp_path / "old", random_model)
    storage = random_model.memory_storage
    random_model.memory_storage = None  # a model that keeps no memory writes the entry
    try:
        lib.add("bees", DOCS["bees"])
    finally:
        random_model.memory_storage = storage
    # As a library written before entries kept memories: no memory fields in its manifest.
    manifest = json.loads((lib.path / MANIFEST).read_text())
    for record in manifest["entries"].values():
        assert record.pop("memory_tokens") == record.pop("memory_bytes") == 0
    (lib.path / MANIFEST).write_text(json.dumps(manifest))
    old = Library.open(lib.path, random_model)
    assert old.list()[0].memory_tokens == 0
    session, _ = old.load("bees")
    assert session.memory is not None and session.memory.is_empty
    assert session.state.tokens > 0
    messages = [{"role": "user", "content": QUESTIONS["bees"]}]
    assert old.session(k=1).chat_layout(messages, 8).read is None
    # A manifest that records a memory the state file lacks is refused when it is read.
    manifest["entries"]["bees"]["memory_tokens"] = 5
    (lib.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptStateError, match="not the one recorded"):
        Library.open(lib.path, random_model).memories.get("bees")


def test_a_question_matching_no_entry_reads_no_memory(random_model, built):
    question = "Bonjour!"
    assert all(score < random_model.memory_threshold for _, score in built.search(question, k=5))
    routed = built.session(k=2)
    messages = [{"role": "user", "content": question}]
    layout = routed.chat_layout(messages, 8)
    assert layout.read is None and layout.header == []
    assert layout.rest == built.session(k=2, memory=False).chat_layout(messages, 8).rest
    # A question that matches reads its entry's memory (ranked first) within the budget.
    messages = [{"role": "user", "content": QUESTIONS["tax"]}]
    read = routed.chat_layout(messages, 8).read
    assert read is not None and 0 < read.tokens <= random_model.memory_budget
    union = built.memories.for_turn(built.embed(QUESTIONS["tax"], "lexical"), 1024)
    tax, _ = built.load("tax")
    assert torch.equal(union.chunks[0].keys, tax.memory.chunks[0].keys)  # ranked first
    assert read.chunks[0] == 0
