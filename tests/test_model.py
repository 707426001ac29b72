"""The adapted model against the unwrapped transformers model, on the real default base."""

import random

import pytest
import torch

from genadapter.session import Session
from genadapter.text import chunked, token_stream

from .conftest import DOCUMENT, TEST_CHUNK


def random_prompts(tokenizer, n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tokenizer), (n, length), generator=g)


def test_empty_session_equals_unwrapped_model(model, random_model, reference):
    ids = random_prompts(model.tokenizer, 3, 40, seed=0)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    for m in (model, random_model):
        got = m.logits(ids, [m.session().state] * 3)
        assert (got - expected).abs().max().item() <= 1e-5
        assert (m.logits(ids) - expected).abs().max().item() <= 1e-5


def test_untrained_generator_with_context_still_equals_base(untrained_model, reference):
    # A fresh generator has B = 0: absorbing changes S but not the outputs.
    model = untrained_model
    s = model.session()
    s.absorb(DOCUMENT)
    assert s.state.tokens > 0 and any(S.abs().max() > 0 for S in s.state.sums.values())
    ids = random_prompts(model.tokenizer, 1, 30, seed=1)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    assert (model.logits(ids, [s.state]) - expected).abs().max().item() <= 1e-5


def assert_same_state(a, b, rtol=1e-5):
    assert a.tokens == b.tokens
    for name in a.sums:
        err = (a.sums[name] - b.sums[name]).norm() / a.sums[name].norm()
        assert err.item() <= rtol, (name, err.item())


def test_absorb_is_order_free_sum(random_model):
    m = random_model
    one_call = m.session()
    one_call.absorb(DOCUMENT)
    assert one_call.state.chunks > 3  # the test document spans several chunks

    # As a stream of pieces, each split just before whitespace.
    rng = random.Random(1)
    spaces = [i for i, c in enumerate(DOCUMENT) if c.isspace()]
    cuts = sorted(rng.sample(spaces, 25))
    pieces = [DOCUMENT[a:b] for a, b in zip([0, *cuts], [*cuts, len(DOCUMENT)])]
    streamed = m.session()
    streamed.absorb(iter(pieces))
    assert_same_state(one_call.state, streamed.state)

    # Its chunks in another order, batched differently, and as two partial states added up.
    chunks = list(chunked(token_stream(m.tokenizer, DOCUMENT), TEST_CHUNK))
    shuffled = chunks[::-1]
    rng.shuffle(shuffled)
    reordered = m.encode_chunks(shuffled)
    assert_same_state(one_call.state, reordered)
    half = len(chunks) // 2
    merged = m.encode_chunks(chunks[half:]).add_(m.encode_chunks(chunks[:half]))
    assert_same_state(one_call.state, merged)

    ids = random_prompts(m.tokenizer, 1, 25, seed=2)
    reference_logits = m.logits(ids, [one_call.state])
    # Sums equal to float32 rounding give logits (magnitude ~20) equal to ~1e-5 relative.
    for state in (streamed.state, reordered, merged):
        assert (m.logits(ids, [state]) - reference_logits).abs().max().item() <= 1e-3


def test_context_changes_only_its_own_sequence(random_model):
    m = random_model
    docs = [DOCUMENT, DOCUMENT[::-1], "Bananas are berries; strawberries are not. " * 20]
    sessions = [m.session() for _ in docs]
    for s, d in zip(sessions, docs):
        s.absorb(d)
    ids = random_prompts(m.tokenizer, 4, 30, seed=3)
    empty = m.logits(ids)
    alone = [m.logits(ids[i : i + 1], [s.state])[0] for i, s in enumerate(sessions)]
    for i in range(3):
        assert (alone[i] - empty[i]).abs().max().item() > 0.05  # context changes the outputs
    # One batch: three sessions with their own states and one empty one.
    batch = m.logits(ids, [s.state for s in sessions] + [None])
    # Alone, a sequence's delta is folded (S_hat^T A once); in a batch of distinct states it is
    # S_hat^T (A x): float32 reassociation moves logits of order 10 by up to about 1e-4.
    for i in range(3):
        assert (batch[i] - alone[i]).abs().max().item() <= 3e-4
    assert (batch[3] - empty[3]).abs().max().item() <= 1e-5


def test_state_bytes_are_independent_of_context_length(random_model):
    s = random_model.session()
    before = s.state.nbytes
    s.absorb("A short note.")
    short, memory = s.state.nbytes, s.memory_bytes
    s.absorb(DOCUMENT * 4)
    assert before == short == s.state.nbytes
    shapes = random_model.generator.state_shapes()
    assert s.state.nbytes == sum(r1 * r2 * 4 for r1, r2 in shapes.values())
    # The session's bytes add the context memory, which grows with what was absorbed.
    assert s.nbytes == s.state.nbytes + s.memory_bytes and s.memory_bytes > memory > 0


def test_greedy_generate_matches_transformers_generate(model, reference):
    prompt = "The history of the printing press begins"
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=2
        )
    expected = model.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert model.session().generate(prompt, max_new_tokens=20) == expected


def test_stream_and_stop_strings(random_model):
    s = random_model.session()
    s.absorb(DOCUMENT)
    full = s.generate("The Vellmar Rail Company", max_new_tokens=24)
    assert "".join(s.generate("The Vellmar Rail Company", max_new_tokens=24, stream=True)) == full
    stop = full.strip()[3:6]
    cut = s.generate("The Vellmar Rail Company", max_new_tokens=24, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_sampling_is_seeded(model):
    s = model.session()
    a = s.generate("Once upon a time", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    b = s.generate("Once upon a time", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    assert a == b


def test_chat_answers_and_keeps_turns(model):
    s = model.session()
    answer = s.chat("What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    streamed = "".join(
        model.session().chat("What is the capital of France?", max_new_tokens=24, stream=True)
    )
    assert streamed == answer
    s.chat("And of Italy?", max_new_tokens=16)
    assert len(s.messages) == 4
    s.reset()
    assert s.messages == [] and s.state.tokens == 0


def test_score_matches_manual_negative_log_likelihood(random_model):
    m = random_model
    s = Session(m, memory=False)  # the adapter state alone (test_context_memory: the memory)
    s.absorb(DOCUMENT)
    prefix, text = "The chief engineer was", " Agathe Lindqvist, who designed a brake."
    p = m.tokenizer.encode(prefix, add_special_tokens=False)
    t = m.tokenizer.encode(text, add_special_tokens=False)
    logits = m.logits(torch.tensor([p + t]), [s.state])[0]
    logp = torch.log_softmax(logits, -1)
    manual = -torch.stack([logp[len(p) + i - 1, tok] for i, tok in enumerate(t)]).mean()
    assert abs(m.score(text, session=s, prefix=prefix) - manual.item()) < 1e-4
    no_prefix = -torch.stack([logp[len(p) + i - 1, tok] for i, tok in enumerate(t)][1:]).mean()
    logits_t = m.logits(torch.tensor([t]), [s.state])[0]
    logp_t = torch.log_softmax(logits_t, -1)
    manual_t = -torch.stack([logp_t[i - 1, t[i]] for i in range(1, len(t))]).mean()
    assert abs(m.score(text, session=s) - manual_t.item()) < 1e-4
    assert no_prefix.item() != manual_t.item()  # the prefix matters
    with pytest.raises(ValueError):
        m.score("")


def test_batched_decoding_equals_one_by_one(random_model):
    from genadapter.generation import SamplingParams, generate_batch, generate_ids

    m = random_model
    with_doc = m.session()
    with_doc.absorb(DOCUMENT)
    prompts = ["The Vellmar Rail Company", "Once upon a time there was", "In 1923"]
    prompts = [m.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    states = [with_doc.state, None, with_doc.state]
    params = [SamplingParams(max_new_tokens=k) for k in (12, 7, 10)]
    got = [[] for _ in prompts]
    for step in generate_batch(m, prompts, states, params):
        for i, token in step:
            got[i].append(token)
    for i in range(3):
        assert got[i] == list(generate_ids(m, prompts[i], states[i], params[i]))
