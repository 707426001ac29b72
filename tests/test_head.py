"""The LM-head adapter (genadapter/head.py) against a reference computed from the base's own
hidden states, on random weights: its state, its delta, its LoRA form and its file format."""

from __future__ import annotations

import pytest
import torch

from genadapter.base import load_base
from genadapter.generator import Generator, GeneratorConfig
from genadapter.head import HEAD_NAME
from genadapter.model import AdaptedModel

from .conftest import DOCUMENT, TEST_CHUNK

WINDOW = 3
HEAD = {"r1": 24, "r2": 16, "alpha": 0.7, "key": "final", "norm": "sqrt"}


@pytest.fixture(scope="module", params=["final", "layer:7", "final+surprisal+token+window"])
def head_model(request):
    base = load_base(None, device="cpu", dtype=torch.float32)
    key, *extra = request.param.split("+")
    weight = "surprisal" if "surprisal" in extra else "none"
    head = {**HEAD, "key": key, "weight": weight, "key_token": "token" in extra}
    head["window"] = WINDOW if "window" in extra else 0
    config = GeneratorConfig(targets=(), head=head, seed=3)
    gen = Generator.for_base(base.model, config).randomize_(seed=4, scale=2.0)
    with torch.no_grad():
        gen.head.norm.mul_(torch.linspace(0.5, 1.5, gen.head.norm.numel()))
        if "token" in extra:
            gen.head.Wt.normal_(0, 0.05, generator=torch.Generator().manual_seed(6))
        if "window" in extra:
            gen.head.Wu.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
        if "surprisal" in extra:
            gen.head.w_gain.fill_(0.7)
            gen.head.w_shift.fill_(2.5)
    return AdaptedModel(base, gen, chunk_tokens=TEST_CHUNK, chunk_batch=2)


def reference_state(model: AdaptedModel, text: str) -> tuple[torch.Tensor, int]:
    """sum over chunks and positions j of w_j k_j v_{j+1}^T, one chunk at a time (each after the
    model's encoding prefix), in float64;
    w_j = sigmoid(gain (s_j - shift)) with s_j = -log p_base(token j+1) for a weighted head;
    k_j gains Wt e(t_j) with token keys; v_j gains Wu sum_{|i-j|<=m} w_i e(t_{i+1}) / (2m+1)
    with a window."""
    head, base = model.generator.head, model.base
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    prefix = model.encoding_prefix  # every chunk is encoded after it; its tokens enter no sum
    p = len(prefix)
    S = torch.zeros(head.config.r1, head.config.r2, dtype=torch.float64)
    for i in range(0, len(ids), TEST_CHUNK):
        chunk = torch.tensor([ids[i : i + TEST_CHUNK]])
        with torch.no_grad():
            out = base.model(torch.tensor([prefix + chunk[0].tolist()]), output_hidden_states=True)
        layer = head.config.key_layer
        h = (out.last_hidden_state if layer is None else out.hidden_states[layer])[0, p:].double()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + head.eps) * head.norm.double()
        e = base.get_input_embeddings().weight[chunk[0]].double()
        E = base.get_output_embeddings().weight.double()
        logp = (out.last_hidden_state[0, p:].double() @ E.T).log_softmax(-1)
        n = len(chunk[0]) - 1
        w = torch.ones(n, dtype=torch.float64)
        if head.config.weight == "surprisal":
            s = torch.stack([-logp[j, chunk[0, j + 1]] for j in range(n)])
            w = torch.sigmoid(head.w_gain.double() * (s - head.w_shift.double()))
        for j in range(n):
            k = head.Wk.double() @ h[j]
            if head.config.key_token:
                k = k + head.Wt.double() @ e[j]
            v = head.Wv.double() @ e[j + 1]
            m = head.config.window
            if m:
                near = range(max(0, j - m), min(n, j + m + 1))
                v = v + head.Wu.double() @ sum(w[i] * e[i + 1] for i in near) / (2 * m + 1)
            S += w[j] * torch.outer(k, v)
    return S, len(ids)


def test_state_is_the_sum_of_next_token_outer_products(head_model):
    session = head_model.session()
    session.absorb(DOCUMENT)
    expected, tokens = reference_state(head_model, DOCUMENT)
    assert session.state.tokens == tokens
    got = session.state.sums[HEAD_NAME].double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_logits_are_the_lm_head_of_the_shifted_hidden_state(head_model):
    session = head_model.session()
    session.absorb(DOCUMENT)
    head = head_model.generator.head
    ids = torch.randint(0, head_model.tokenizer.vocab_size, (1, 21), generator=torch.Generator())
    got = head_model.logits(ids, [session.state])[0]
    with torch.no_grad():
        x = head_model.base.model(ids).last_hidden_state[0]
    S_hat = session.state.sums[HEAD_NAME] / session.state.tokens**0.5
    E = head_model.base.get_output_embeddings().weight
    delta_w = head.alpha * (E @ head.B) @ S_hat.T @ head.A  # the LoRA form on lm_head
    expected = x @ E.T + x @ delta_w.T
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    assert (got - x @ E.T).abs().max() > 1e-2  # the state does change the logits


def test_empty_session_is_the_base_exactly(head_model, reference):
    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(5))
    empty = head_model.session().state
    got = head_model.logits(ids, [empty, None])
    with torch.no_grad():
        expected = reference(ids).logits
    assert torch.equal(got, expected)


def test_chunk_order_does_not_change_the_state(head_model):
    ids = head_model.tokenizer.encode(DOCUMENT, add_special_tokens=False)
    chunks = [ids[i : i + TEST_CHUNK] for i in range(0, len(ids), TEST_CHUNK)]
    a = head_model.encode_chunks(chunks).sums[HEAD_NAME]
    b = head_model.encode_chunks(chunks[::-1]).sums[HEAD_NAME]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_a_head_generator_round_trips(head_model, tmp_path):
    gen = head_model.generator
    gen.save_pretrained(tmp_path, head_model.base_fingerprint)
    again = Generator.from_pretrained(tmp_path, head_model.base_fingerprint)
    assert again.fingerprint() == gen.fingerprint()
    assert again.config.head == gen.config.head
    assert again.state_shapes() == {HEAD_NAME: (HEAD["r1"], HEAD["r2"])}


def test_bad_head_config_is_refused():
    with pytest.raises(ValueError, match="norm"):
        GeneratorConfig(targets=(), head={"norm": "softmax"})
    with pytest.raises(ValueError, match="key"):
        GeneratorConfig(targets=(), head={"key": "middle"})
    with pytest.raises(ValueError, match="window"):
        GeneratorConfig(targets=(), head={"window": -1})
    with pytest.raises(ValueError, match="weight"):
        GeneratorConfig(targets=(), head={"weight": "entropy"})
    with pytest.raises(ValueError, match="needs target layers"):
        GeneratorConfig(targets=(), head=None)


def test_a_key_layer_past_the_base_is_refused(head_model):
    with pytest.raises(ValueError, match="past the base"):
        Generator.for_base(head_model.base, GeneratorConfig(targets=(), head={"key": "layer:99"}))
