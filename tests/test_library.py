"""The adapter library (genadapter/library/) and per-token routing (library/routing.py), on the
default base with a random generator (nonzero B, so every state changes the logits)."""

import json

import pytest
import torch

from genadapter.layers import routed_linear
from genadapter.library.entry import MissingEmbeddingError
from genadapter.library.folder import MANIFEST, Library
from genadapter.library.routing import Routes, mixed_down, route, standardize
from genadapter.session import Session
from genadapter.state import AdapterState, CorruptStateError, IncompatibleStateError

from .conftest import DOCUMENT, TEST_CHUNK, assert_umask_modes, usual_umask
from .library_kit import DOCS, PROMPT, QUESTIONS, library_of_docs


@pytest.fixture(scope="module")
def built(random_model, tmp_path_factory):
    """A library holding every DOCS entry, added in one process."""
    return library_of_docs(random_model, tmp_path_factory.mktemp("lib") / "all")


def _ids(model, text=PROMPT):
    return torch.tensor([model.tokenizer.encode(text, add_special_tokens=False)])


def test_add_list_remove_round_trip(random_model, tmp_path):
    with usual_umask():
        lib = Library.create(tmp_path / "lib", random_model)
        stats = lib.add("rail", DOCUMENT)
        (tmp_path / "b.txt").write_text(DOCS["bees"])
        lib.add("bees", [tmp_path / "b.txt"])
    assert [e.name for e in lib.list()] == ["bees", "rail"] and stats.tokens > 0
    assert_umask_modes(tmp_path / "lib")  # readable by others, as any file the user writes
    # Reopened from disk without a model: the manifest alone lists and removes.
    bare = Library.open(tmp_path / "lib")
    assert [(e.name, e.tokens) for e in bare.list()] == [(e.name, e.tokens) for e in lib.list()]
    bare.remove("rail")
    assert not (tmp_path / "lib" / "entries" / "rail").exists()
    again = Library.open(tmp_path / "lib", random_model)
    assert [e.name for e in again.list()] == ["bees"]
    with pytest.raises(KeyError, match="no entry 'rail'"):
        again.remove("rail")
    with pytest.raises(ValueError, match="already has an entry"):
        again.add("bees", DOCUMENT)
    with pytest.raises(ValueError, match="entry name"):
        again.add("../escape", DOCUMENT)
    with pytest.raises(ValueError, match="without a model"):
        bare.add("x", DOCUMENT)
    # The stored state is an ordinary saved session: the one a session absorbing the file makes.
    session, gates = again.load("bees")
    direct = random_model.session()
    direct.absorb(DOCS["bees"])
    assert session.state.checksum() == direct.state.checksum()
    assert set(gates) == set(random_model.generator.shapes)


def test_one_entry_routes_exactly_like_its_session(random_model, tmp_path):
    lib = Library.create(tmp_path / "one", random_model)
    lib.add("rail", DOCUMENT)
    session = Session(random_model, memory=False)  # routing mixes adapter states alone
    session.absorb(DOCUMENT)
    ids = _ids(random_model)
    want = random_model.logits(ids, [session.state])
    got = lib.session(k=2).logits(ids)
    # With one entry its weight is exactly 1 and the delta takes the same folded matmuls as the
    # session: equal to float32 rounding (observed: bit-equal).
    assert (got - want).abs().max() <= 1e-5
    assert (want - random_model.logits(ids)).abs().max() > 1e-2  # the state does change them
    text = "The line was electrified in 1923."
    assert lib.session(k=2).score(text) == pytest.approx(
        random_model.score(text, session), abs=1e-6
    )
    assert abs(random_model.score(text, session) - random_model.score(text)) > 1e-3
    # model.score given the routed session routes too (it does not read an empty state).
    assert random_model.score(text, lib.session(k=2)) == lib.session(k=2).score(text)
    # The routed adapter states alone (entries' memories: test_a_one_entry_routed_turn_...).
    routed = lib.session(k=2, memory=False).generate(PROMPT, max_new_tokens=8)
    assert routed == session.generate(PROMPT, max_new_tokens=8)


def test_gates_do_not_depend_on_the_rest_of_the_library(random_model, built, tmp_path):
    alone = Library.create(tmp_path / "alone", random_model)
    alone.add("bees", DOCS["bees"])
    s1, g1 = alone.load("bees")
    s2, g2 = built.load("bees")
    assert s1.state.checksum() == s2.state.checksum()
    for name in g1:
        assert torch.equal(g1[name], g2[name])
    # and the gates are the document's own: another document's differ
    _, other = built.load("tax")
    assert all(not torch.allclose(g1[n], other[n], atol=1e-3) for n in g1)


def test_two_halves_merged_equal_one_library(random_model, built, tmp_path):
    first = Library.create(tmp_path / "first", random_model)
    second = Library.create(tmp_path / "second", random_model)
    names = list(DOCS)
    for name in names[:2]:
        first.add(name, DOCS[name])
    for name in names[2:]:
        second.add(name, DOCS[name])
    assert first.merge(Library.open(tmp_path / "second", random_model)) == names[2:]
    merged = Library.open(tmp_path / "first", random_model)
    key = lambda e: (e.name, e.tokens, e.chunks, e.state_sha256)  # noqa: E731
    assert list(map(key, merged.list())) == list(map(key, built.list()))
    ids = _ids(random_model)
    assert torch.equal(merged.session(k=2).logits(ids), built.session(k=2).logits(ids))
    for kind in ("lexical", "behaviour"):  # the stored embeddings came along
        assert torch.equal(merged.embeddings(kind)[1], built.embeddings(kind)[1]), kind
    with pytest.raises(ValueError, match="both libraries have entries named bees"):
        merged.merge(built)


def test_routing_mixes_each_tokens_top_k(random_model, built):
    ids = _ids(random_model)
    logits = {k: built.session(k=k).logits(ids) for k in (1, 2, 3)}
    assert (logits[1] - logits[2]).abs().max() > 1e-3
    assert (logits[2] - logits[3]).abs().max() > 1e-3
    # The default gates are the closed form; centred on a fixed background they route otherwise.
    assert built.session(k=1).gates == "closed"
    assert (built.session(k=1, gates="centred").logits(ids) - logits[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="'closed' or 'centred'"):
        built.session(k=1, gates="trained")
    for name in DOCS:  # no single entry's session gives the routed answer
        s, _ = built.load(name)
        assert (random_model.logits(ids, [s.state]) - logits[2]).abs().max() > 1e-3


def test_search_ranks_the_document_a_question_is_about_first(random_model, built, tmp_path):
    # Embeddings come from the base's layer inputs alone (the generator does not enter them).
    for name, question in QUESTIONS.items():
        found = built.search(question, k=2)
        assert found[0][0] == name, (question, found)
        assert -1 <= found[1][1] < found[0][1] <= 1
    names, docs = built.embeddings()
    alone = Library.create(tmp_path / "alone", random_model)
    alone.add("tax", DOCS["tax"])
    assert torch.allclose(alone.embeddings()[1][0], docs[names.index("tax")], atol=1e-6)
    # A document's own text is its nearest entry, at cosine ~1 (its embedding is its gates).
    assert built.search(DOCS["bees"], k=1)[0][0] == "bees"
    assert built.search(DOCS["bees"], k=1)[0][1] > 0.999
    empty = Library.create(tmp_path / "empty", random_model)
    with pytest.raises(ValueError, match="no entries"):
        empty.search("anything")
    with pytest.raises(ValueError, match="no entries"):
        empty.session(k=2)


def test_routed_linear_against_a_token_by_token_reference():
    g = torch.Generator().manual_seed(0)
    n, r2, d_in, d_out = 5, 4, 16, 8
    base = torch.nn.Linear(d_in, d_out)
    B = torch.randn(d_out, r2, generator=g)
    routes = Routes(standardize(torch.randn(n, d_in, generator=g)), torch.randn(n, r2, d_in), 2)
    x = torch.randn(2, 7, d_in, generator=g)
    center = torch.randn(d_in, generator=g)
    with torch.no_grad():
        got = routed_linear(x, base, routes, B)
        want = torch.empty_like(got)
        for b in range(2):
            for t in range(7):
                xs = (x[b, t] - x[b, t].mean()) / x[b, t].std(unbiased=False)
                scores = routes.gates @ xs / d_in**0.5
                top = scores.argsort(descending=True)[:2]
                w = torch.softmax(scores[top], 0)
                delta = sum(w[j] * B @ (routes.downs[top[j]] @ x[b, t]) for j in range(2))
                want[b, t] = base(x[b, t]) + delta
    assert (got - want).abs().max() < 1e-4  # float32, sums of 16 and 4 terms
    # A background center is subtracted from each token's input before it is standardized.
    w, i = route(x, routes.gates, 2, center)
    w0, i0 = route(x - center, routes.gates, 2)
    assert torch.equal(i, i0) and torch.allclose(w, w0, atol=1e-6)
    assert not torch.equal(i, route(x, routes.gates, 2)[1])
    # Few tokens gather their k documents' D instead of multiplying by all N: the same mix.
    one = x[:, :1]
    assert (
        mixed_down(one, routes) - mixed_down(one.expand(2, 3, d_in), routes)[:, :1]
    ).abs().max() < 1e-5
    # One token (decode at batch 1) reads its k documents' D in place: the same mix again.
    for b, t in ((0, 0), (1, 6)):
        single = routed_linear(x[b : b + 1, t : t + 1], base, routes, B)
        assert (single[0, 0] - want[b, t]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="k >= 1"):
        mixed_down(x, Routes(routes.gates, routes.downs, 0))


def test_corrupt_and_foreign_entries_fail_clearly(random_model, built, tmp_path):
    import shutil

    shutil.copytree(built.path, tmp_path / "lib")
    lib = Library.open(tmp_path / "lib", random_model)
    state_file = tmp_path / "lib" / "entries" / "rail" / "state.safetensors"
    data = bytearray(state_file.read_bytes())
    data[-3] ^= 0xFF
    state_file.write_bytes(bytes(data))
    with pytest.raises(CorruptStateError, match="checksum mismatch"):
        lib.load("rail")
    with pytest.raises(CorruptStateError):
        lib.session(k=2)
    # An entry re-saved (with a valid checksum) as made by another generator.
    bees = tmp_path / "lib" / "entries" / "bees" / "state.safetensors"
    state, meta = AdapterState.load(bees)
    state.save(bees, dict(meta, generator_fingerprint="0" * 16))
    with pytest.raises(IncompatibleStateError, match="another generator"):
        lib.load("bees")
    # Another entry's gates in place of this one's.
    tax = tmp_path / "lib" / "entries" / "tax"
    shutil.copy(tmp_path / "lib" / "entries" / "bees" / "gates.safetensors", tax)
    with pytest.raises(CorruptStateError, match="not the gates of this entry"):
        lib.load("tax")
    # A library made for another generator is refused when opened.
    manifest = json.loads((tmp_path / "lib" / MANIFEST).read_text())
    manifest["generator_fingerprint"] = "f" * 16
    (tmp_path / "lib" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IncompatibleStateError, match="another generator"):
        Library.open(tmp_path / "lib", random_model)
    (tmp_path / "lib" / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptStateError, match="not a genadapter library"):
        Library.open(tmp_path / "lib")
    with pytest.raises(FileNotFoundError, match="no library"):
        Library.open(tmp_path / "nowhere", random_model)


def test_behaviour_embeddings_are_each_documents_own(random_model, built, tmp_path):
    from genadapter.library import embedding

    dim = len(embedding.PROBES) * embedding.PROJECTION_DIM
    names, docs = built.embeddings(kind="behaviour")
    assert docs.shape == (len(DOCS), dim) and docs.dtype == torch.float32
    assert torch.allclose(docs.norm(dim=-1), torch.ones(len(DOCS)), atol=1e-5)
    # Stored at add time from the document alone: a library holding only it stores the same.
    alone = Library.create(tmp_path / "alone", random_model)
    alone.add("bees", DOCS["bees"])
    assert torch.equal(alone.embeddings("behaviour")[1][0], docs[names.index("bees")])
    assert (docs[names.index("bees")] - docs[names.index("tax")]).abs().max() > 1e-3
    # A prompt lands in the same space; deterministic.
    query = built.embed(QUESTIONS["bees"], kind="behaviour")
    assert query.shape == (dim,) and torch.equal(query, alone.embed(QUESTIONS["bees"], "behaviour"))
    found = built.search(QUESTIONS["bees"], k=len(DOCS), kind="behaviour")
    assert sorted(n for n, _ in found) == sorted(DOCS) and all(-1 <= s <= 1 for _, s in found)
    for call in (lambda: built.search("x", kind="gates"), lambda: built.embeddings("nope")):
        with pytest.raises(ValueError, match="unknown embedding kind"):
            call()
    with pytest.raises(ValueError, match="unknown embedding kind"):
        built.embed("x", kind="Behaviour")
    # An entry without the file (made before it existed) computes the same vector from its state.
    (alone.path / "entries" / "bees" / "behaviour.safetensors").unlink()
    again = Library.open(alone.path, random_model)
    assert torch.allclose(again.embeddings("behaviour")[1][0], docs[names.index("bees")], atol=1e-6)


def test_an_entry_absorbed_in_steps_equals_one_added_whole(random_model, built, tmp_path):
    from genadapter.library.entry import EntryDraft
    from genadapter.text import chunked, token_stream

    lib = Library.create(tmp_path / "steps", random_model)
    draft = EntryDraft(random_model)
    with pytest.raises(ValueError, match="nothing was absorbed"):
        lib.commit("rail", draft)
    for chunk in chunked(token_stream(random_model.tokenizer, DOCS["rail"]), TEST_CHUNK):
        draft.encode([chunk])  # one chunk per call, as the server's model thread does
    draft.state.documents = 1
    lib.commit("rail", draft)
    with pytest.raises(ValueError, match="already has an entry"):
        lib.commit("rail", draft)
    # Unpadded one-chunk forwards against add's padded batches of 3: equal to float rounding.
    whole, gates = built.load("rail")
    steps, step_gates = lib.load("rail")
    assert steps.state.tokens == whole.state.tokens and steps.state.documents == 1
    for n in gates:
        assert torch.allclose(step_gates[n], gates[n], atol=1e-4), n
        assert torch.allclose(steps.state.sums[n], whole.state.sums[n], rtol=1e-4, atol=1e-4), n
    names, lexical = built.embeddings("lexical")
    assert torch.allclose(lib.embeddings("lexical")[1][0], lexical[names.index("rail")], atol=1e-5)


def _lexical_reference(model, text: str) -> torch.Tensor:
    """The text read chunk by chunk (the model's chunk_tokens, each after its encoding prefix) by
    the transformers model: each token id's largest surprisal (a chunk's first token gets the
    mean of the chunk's others), scaled to norm 1."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    prefix = model.encoding_prefix
    bag = torch.zeros(model.base.config.vocab_size)
    for at in range(0, len(ids), model.chunk_tokens):
        chunk = torch.tensor(ids[at : at + model.chunk_tokens])
        with model.bind_states(None), torch.no_grad():
            read = torch.tensor([prefix + chunk.tolist()])
            logits = model.base(input_ids=read).logits[0, len(prefix) : -1].float()
        s = -torch.log_softmax(logits, -1)[torch.arange(len(chunk) - 1), chunk[1:]]
        for i, w in zip(chunk.tolist(), [s.mean().item(), *s.tolist()]):
            bag[i] = max(bag[i].item(), w)
    return bag / bag.norm()


def test_lexical_embeddings_find_the_document_a_question_is_about(
    random_model, built, tmp_path, caplog
):
    names, docs = built.embeddings("lexical")
    assert docs.shape == (len(DOCS), random_model.base.config.vocab_size)
    # Against a plain reference on the same base; made from the document's text alone.
    assert len(random_model.tokenizer.encode(DOCS["rail"])) > 2 * random_model.chunk_tokens
    for name in ("rail", "tax"):  # rail: several chunks, absorbed 3 at a time (chunk_batch)
        ref = _lexical_reference(random_model, DOCS[name])
        assert (docs[names.index(name)] - ref).abs().max() < 1e-5, name
    query = built.embed(QUESTIONS["tax"], "lexical")
    assert (query - _lexical_reference(random_model, QUESTIONS["tax"])).abs().max() < 1e-5
    # Lexical search is the default, and each question finds its document first on this base.
    for name, question in QUESTIONS.items():
        assert built.search(question, k=1)[0][0] == name, question
    # A document given as a stream of pieces is embedded as the whole text.
    alone = Library.create(tmp_path / "alone", random_model)
    text = DOCS["bees"]
    alone.add("bees", (text[i : i + 7] for i in range(0, len(text), 7)))
    assert torch.equal(alone.embeddings("lexical")[1][0], docs[names.index("bees")])
    # The text is not kept: an entry without its lexical file (added before it existed) cannot
    # be searched lexically; the default search then falls back to the internal embedding.
    (alone.path / "entries" / "bees" / "lexical.safetensors").unlink()
    old = Library.open(alone.path, random_model)
    with pytest.raises(MissingEmbeddingError, match="add it again"):
        old.search("bees", kind="lexical")
    with caplog.at_level("WARNING", logger="genadapter.library.search"):
        assert old.search("bees") == old.search("bees", kind="internal")
    assert "searching" in caplog.text and "with kind 'internal'" in caplog.text
    for bad in ("  ", None, b"bees"):  # refused before any entry is read, whatever the kind
        with pytest.raises(ValueError, match="non-empty text"):
            old.search(bad, kind="lexical")


def test_corrupt_behaviour_embedding_fails_clearly(random_model, built, tmp_path):
    import shutil

    shutil.copytree(built.path, tmp_path / "lib")
    entries = tmp_path / "lib" / "entries"
    data = bytearray((entries / "rail" / "behaviour.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (entries / "rail" / "behaviour.safetensors").write_bytes(bytes(data))
    lib = Library.open(tmp_path / "lib", random_model)
    with pytest.raises(CorruptStateError, match="checksum mismatch"):
        lib.search("trains", kind="behaviour")
    shutil.copy(entries / "bees" / "behaviour.safetensors", entries / "rail")
    with pytest.raises(CorruptStateError, match="not the behaviour embedding of this entry"):
        Library.open(tmp_path / "lib", random_model).embeddings("behaviour")
    shutil.copy(entries / "bees" / "lexical.safetensors", entries / "tax")
    with pytest.raises(CorruptStateError, match="not the lexical embedding of this entry"):
        Library.open(tmp_path / "lib", random_model).search("penalty", kind="lexical")
