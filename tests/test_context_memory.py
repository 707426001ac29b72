"""The context memory (memory.py, memory_read.py): reference equalities against plain transformers
forwards, storage, persistence and selection, on the real default base."""

import pytest
import torch
from transformers import DynamicCache

from genadapter.generation import SamplingParams, generate_batch, generate_ids, prefill
from genadapter.memory import ContextMemory, quantize_chunk, split_template
from genadapter.memory_read import SEPARATOR, Layout, rotate
from genadapter.state import CorruptStateError

from .conftest import DOCUMENT, assert_umask_modes, usual_umask

QUESTION = "When was the Vellmar Rail Company founded?"
OTHER = """The Quillon Observatory stands on Mount Harrow. Its great refractor, a 61-centimetre lens
ground by Ottilie Brandt in 1902, found the comet that bears her name."""


@pytest.fixture
def exact(untrained_model, monkeypatch):
    """The default base, its memory kept in float32 (exact), chunks of 512 tokens."""
    monkeypatch.setattr(untrained_model, "memory_storage", "float")
    monkeypatch.setattr(untrained_model, "chunk_tokens", 512)
    return untrained_model


def test_an_empty_memory_reads_nothing(exact):
    s = exact.session()
    layout = s.chat_layout([{"role": "user", "content": QUESTION}], 8)
    assert layout.read is None and layout.header == []
    assert s.memory.is_empty and s.memory_bytes == 0


def test_one_chunk_reads_as_prompting(exact, reference):
    """Memory logits equal a plain transformers forward of the prompt with the document at the
    start of the user message, followed by SEPARATOR and the question."""
    s = exact.session()
    s.absorb(DOCUMENT)
    assert s.state.chunks == 1 and len(s.memory.chunks) > 1  # one chunk, in several blocks
    messages = [{"role": "user", "content": QUESTION}]
    layout = s.chat_layout(messages, 8)
    assert layout.read is not None and layout.read.tokens == s.memory.tokens
    header, rest_text = split_template(exact.tokenizer, messages)
    doc = exact.tokenizer.encode(DOCUMENT, add_special_tokens=False)
    rest = exact.tokenizer.encode(SEPARATOR + rest_text, add_special_tokens=False)
    assert layout.header == header and layout.rest == rest
    with torch.no_grad():
        want = reference(input_ids=torch.tensor([header + doc + rest])).logits[0, -len(rest) :]
        _, got = prefill(exact, [layout], DynamicCache(), logits_to_keep=0)
    assert torch.allclose(got[0], want, atol=2e-4, rtol=0), (got[0] - want).abs().max()


def test_a_later_chunk_is_rotated_to_where_it_is_read(exact, reference):
    """Layer 0's keys depend on the token and position alone: a chunk read after another must
    have exactly the keys prompting computes at those positions."""
    exact.chunk_tokens = 40
    s = exact.session()
    s.absorb(DOCUMENT)
    assert len(s.memory.chunks) > 2
    header, _ = split_template(exact.tokenizer, [{"role": "user", "content": "x"}])
    read = s.read(None, len(header), 10_000)
    doc = exact.tokenizer.encode(DOCUMENT, add_special_tokens=False)
    cache = DynamicCache()
    with torch.no_grad():
        reference(input_ids=torch.tensor([header + doc]), past_key_values=cache, use_cache=True)
    want = cache.layers[0].keys[0, :, len(header) :]
    assert torch.allclose(read.keys[0], want, atol=1e-4), (read.keys[0] - want).abs().max()


def test_rotations_compose(exact):
    k = torch.randn(3, 7, 64)
    assert torch.allclose(rotate(exact, rotate(exact, k, 5), 11), rotate(exact, k, 16), atol=1e-4)
    assert torch.allclose(rotate(exact, rotate(exact, k, 9), -9), k, atol=1e-4)


def test_batched_rows_with_different_memories_decode_as_alone(exact):
    a, b = exact.session(), exact.session()
    a.absorb(DOCUMENT)
    b.absorb(OTHER)
    plain = exact.session()
    msgs = [{"role": "user", "content": QUESTION}]
    other = [{"role": "user", "content": "Who ground the lens of the Quillon Observatory?"}]
    layouts = [a.chat_layout(msgs, 6), b.chat_layout(other, 6), plain.chat_layout(msgs, 6)]
    assert layouts[0].read.tokens != layouts[1].read.tokens and layouts[2].read is None
    params = [SamplingParams(6)] * 3
    got = [[], [], []]
    for step in generate_batch(exact, layouts, [None] * 3, params):
        for i, token in step:
            got[i].append(token)
    for i, layout in enumerate(layouts):
        assert got[i] == list(generate_ids(exact, layout, None, params[i]))


def test_int8_storage_is_close_and_small():
    keys, values = torch.randn(2, 3, 50, 64) * 3, torch.randn(2, 3, 50, 64)
    k, v, ks, vs = quantize_chunk(keys, values, "int8")
    assert k.dtype == v.dtype == torch.int8
    assert (k.float() * ks.float() - keys).abs().le(ks.float() * 0.51 + 1e-3).all()
    assert (v.float() * vs.float() - values).abs().le(vs.float() * 0.51 + 1e-3).all()
    int8_bytes = sum(t.numel() * t.element_size() for t in (k, v, ks, vs))
    assert int8_bytes / (2 * keys.numel() * 2) <= 0.52  # against a bf16 KV cache


def test_save_load_round_trip_keeps_the_memory(model, tmp_path):
    s = model.session()
    s.absorb(DOCUMENT)
    s.absorb(OTHER)
    with usual_umask():
        path = s.save(tmp_path / "s")
    assert_umask_modes(path)  # not the owner-only mode of the atomic write's temp file
    loaded = model.load_session(path)
    assert loaded.memory.documents == 2 and len(loaded.memory.chunks) == len(s.memory.chunks)
    for x, y in zip(s.memory.chunks, loaded.memory.chunks, strict=True):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        assert torch.equal(x.key_scale, y.key_scale) and x.document == y.document
    assert loaded.chat(QUESTION, max_new_tokens=8) == s.chat(QUESTION, max_new_tokens=8)


def test_a_damaged_memory_is_refused(model, tmp_path):
    s = model.session()
    s.absorb(DOCUMENT)
    path = s.save(tmp_path / "s")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x55  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStateError):
        model.load_session(path)


def test_a_session_saved_without_memory_loads_with_an_empty_one(model, tmp_path):
    s = model.session()
    s.absorb(DOCUMENT)
    s.memory = None
    path = s.save(tmp_path / "s")
    loaded = model.load_session(path)
    assert loaded.memory is not None and loaded.memory.is_empty
    assert loaded.state.checksum() == s.state.checksum()


def test_union_of_memories_equals_absorbing_both(model):
    both = model.session()
    both.absorb(DOCUMENT)
    both.absorb(OTHER)
    a, b = model.session(), model.session()
    a.absorb(DOCUMENT)
    b.absorb(OTHER)
    a.memory.extend(b.memory)
    assert [c.document for c in a.memory.chunks] == [c.document for c in both.memory.chunks]
    for x, y in zip(a.memory.chunks, both.memory.chunks, strict=True):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


def test_selection_reads_the_questions_document_and_nothing_for_unrelated_ones(model):
    s = model.session()
    s.absorb(OTHER)
    s.absorb(DOCUMENT)
    s.absorb("Lemon tart needs butter, sugar, eggs and the zest of four lemons.")
    from genadapter.library.embedding import lexical

    picked = s.memory.select(lexical(model, [QUESTION]), budget=4096)
    assert picked and {s.memory.chunks[i].document for i in picked} == {1}
    # Nothing is read for a question that shares no word with any document. (A question sharing
    # only a function word can pass the gate: docs/MEMORY.md, "Selection".)
    assert s.read("Who wrote Hamlet?", 20, 4096) is None


def test_a_session_answers_from_its_memory(untrained_model, monkeypatch):
    """The real base answers from an absorbed document, without it in the prompt (int8 memory,
    the default chunks of 512 tokens)."""
    monkeypatch.setattr(untrained_model, "chunk_tokens", 512)
    assert "1871" not in untrained_model.session().chat(QUESTION, max_new_tokens=24)
    s = untrained_model.session()
    s.absorb(DOCUMENT)
    assert "1871" in s.chat(QUESTION, max_new_tokens=24)


def test_memory_kinds_are_checked(model):
    with pytest.raises(ValueError, match="storage"):
        quantize_chunk(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), "int3")
    other = ContextMemory(prefix_len=3)
    with pytest.raises(ValueError, match="prefix"):
        model.new_memory().extend(other)
    assert Layout([1], None, [2, 3]).__len__() == 3


def test_memory_fraction_caps_each_read_to_a_share_of_the_memory(untrained_model, monkeypatch):
    """memory_fraction: a turn reads at most that share of the memory's tokens (at least one
    block), within memory_budget; without it, the budget alone."""
    monkeypatch.setattr(untrained_model, "memory_block", 16)
    s = untrained_model.session()
    s.absorb(DOCUMENT)
    held = s.memory_tokens
    whole = s.read(None, 20, 4096)
    assert whole is not None and whole.tokens == held
    monkeypatch.setattr(untrained_model, "memory_fraction", 0.25)
    quarter = s.read(None, 20, 4096)
    assert 0 < quarter.tokens <= round(0.25 * held) and quarter.tokens > 0.25 * held - 16
    assert s.read(None, 20, 16).tokens <= 16  # the budget still applies
    monkeypatch.setattr(untrained_model, "memory_fraction", 0.001)
    assert 0 < s.read(None, 20, 4096).tokens <= 16  # a budget of one block, not nothing


def test_memory_reading_options_are_checked():
    """Checked before anything loads."""
    import genadapter

    for bad in ({"memory_budget": 0}, {"memory_block": 2.5}, {"memory_fraction": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            genadapter.load(base="/nonexistent", **bad)
