"""The decode paths of bound states (layers.folded_linear, layers.batched_linear) against the
generator's reference delta, on random inputs and on the default model with a random generator.

Tolerances: the fast paths reorder float32 products (S_hat^T A once instead of S_hat^T (A x) per
token), so they match the reference to float32 rounding, not bit for bit: layer outputs within
1e-5 of their scale, logits within 1e-4 absolute (logits are of order 10). Rows without a state
are exactly the base."""

import pytest
import torch

from genadapter.layers import AdaptedLinear, batched_linear, bound, folded_linear

from .conftest import DOCUMENT


def _layer(model, index: int, kind: str) -> AdaptedLinear:
    block = model.base.model.layers[index]
    layer = block.self_attn.o_proj if kind == "o_proj" else block.mlp.down_proj
    assert isinstance(layer, AdaptedLinear)
    return layer


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> bool:
    return (got - want).abs().max().item() <= rtol * want.abs().max().item()


@pytest.mark.parametrize("kind", ["o_proj", "down_proj"])
@torch.no_grad()
def test_folded_and_batched_deltas_match_the_reference(random_model, kind):
    layer = _layer(random_model, 5, kind)
    adapter = layer.adapter
    g = torch.Generator().manual_seed(3)
    r1, r2 = random_model.generator.state_shapes()[layer.name]
    x = torch.randn(3, 4, layer.base.in_features, generator=g)
    s_hat = torch.randn(3, r1, r2, generator=g)
    want = layer.base(x) + adapter.delta(x, s_hat)
    shared = layer.base(x) + adapter.delta(x, s_hat[:1])
    assert _close(folded_linear(x, layer.base, adapter.fold(s_hat[0]), adapter.B), shared)
    assert _close(batched_linear(x, layer.base, adapter, s_hat), want)
    # The delta is not negligible at this scale, so the comparison says something.
    assert (want - layer.base(x)).abs().max() > 0.1 * want.abs().max()
    # A row whose state is zero is the base row exactly.
    s_hat[1] = 0
    assert torch.equal(batched_linear(x, layer.base, adapter, s_hat)[1], layer.base(x)[1])


@torch.no_grad()
def test_fast_paths_need_no_grad_and_a_decode_binding(random_model):
    """Under gradients (training) the layer computes the reference delta bit for bit."""
    layer = _layer(random_model, 2, "o_proj")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, layer.base.in_features, generator=g)
    s_hat = torch.randn(1, *random_model.generator.state_shapes()[layer.name], generator=g)
    folded = {layer.name: layer.adapter.fold(s_hat[0])}
    with bound(layer.binding, s_hat={layer.name: s_hat}, folded=folded):
        fast = layer(x)
        with torch.enable_grad():
            slow = layer(x)
    assert torch.equal(slow, layer.base(x) + layer.adapter.delta(x, s_hat))
    assert _close(fast, slow) and not torch.equal(fast, slow)


def _logits(model, ids, states, fast: bool):
    model.fast_delta = fast
    try:
        return model.logits(ids, states)
    finally:
        model.fast_delta = True


def test_session_logits_folded_and_batched_match_the_reference(random_model):
    s1, s2 = random_model.session(), random_model.session()
    s1.absorb(DOCUMENT)
    s2.absorb(DOCUMENT[:300])
    ids = torch.tensor([random_model.tokenizer.encode("The chief engineer was Agathe")] * 3)
    states = [s1.state, None, s2.state]
    for batch in ([s1.state], [s1.state] * 3, states):  # one state, shared, distinct
        x = ids[: len(batch)]
        ref = _logits(random_model, x, batch, fast=False)
        fast = _logits(random_model, x, batch, fast=True)
        assert (fast - ref).abs().max() < 1e-4
    # The state changes the logits (so the comparison above is not base against base), and the
    # row without a state is exactly the base's row in the same batch.
    base = random_model.logits(ids, None)
    mixed = _logits(random_model, ids, states, fast=True)
    assert (mixed[0] - base[0]).abs().max() > 0.1
    assert torch.equal(mixed[1], base[1])


def test_fold_is_cached_until_the_state_changes(random_model):
    s = random_model.session()
    s.absorb(DOCUMENT[:400])
    gen = random_model.generator
    first = gen.folded(s.state)
    assert gen.folded(s.state) is first
    ids = torch.tensor([random_model.tokenizer.encode("The Kestrel stands in")])
    s.absorb(DOCUMENT[400:])
    assert gen.folded(s.state) is not first
    ref = _logits(random_model, ids, [s.state], fast=False)
    assert (_logits(random_model, ids, [s.state], fast=True) - ref).abs().max() < 1e-4


def test_only_the_latest_states_keep_their_fold(random_model):
    """A fold is 33x the state's size: the model keeps it for FOLDED_STATES states only."""
    from genadapter.model import FOLDED_STATES

    sessions = [random_model.session() for _ in range(FOLDED_STATES + 1)]
    ids = torch.tensor([random_model.tokenizer.encode("The harbour")])
    for i, s in enumerate(sessions):
        s.absorb(DOCUMENT[40 * i : 40 * i + 200])
        random_model.logits(ids, [s.state])
    assert "folded" not in sessions[0].state._derived
    assert all("folded" in s.state._derived for s in sessions[1:])
