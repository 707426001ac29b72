"""Key/value pairings ("same", "next", "both"), checked against a loop over tokens."""

from __future__ import annotations

import json

import pytest
import torch

from genadapter.base import load_base
from genadapter.generator import Generator, GeneratorConfig, GeneratorFormatError, pair_sums
from genadapter.model import AdaptedModel
from genadapter.text import chunked, token_stream

from .conftest import DOCUMENT, TEST_CHUNK


def loop_pair_sums(k, v, mask, pairing):
    """sum over t of k_t v_{t+o}^T, column by column, o = 1 for "next" columns."""
    half = v.shape[2] // 2
    out = torch.zeros(k.shape[0], k.shape[2], v.shape[2], dtype=torch.float64)
    for b in range(k.shape[0]):
        for j in range(v.shape[2]):
            o = 1 if pairing == "next" or (pairing == "both" and j >= half) else 0
            for t in range(k.shape[1] - o):
                if mask[b, t] and mask[b, t + o]:
                    out[b, :, j] += k[b, t].double() * v[b, t + o, j].double()
    return out


@pytest.mark.parametrize("pairing", ["same", "next", "both"])
def test_pair_sums_match_a_loop_over_real_token_pairs(pairing):
    g = torch.Generator().manual_seed(len(pairing))
    k, v = torch.randn(3, 9, 4, generator=g), torch.randn(3, 9, 6, generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    mask[2, 1:] = 0  # a one-token sequence: no "next" pair at all
    got = pair_sums(k, v, mask, pairing)
    expected = loop_pair_sums(k, v, mask, pairing)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    if pairing == "next":
        assert got[2].abs().max() == 0


def test_next_pairing_state_is_the_sum_of_consecutive_pairs_per_chunk():
    base = load_base(None, device="cpu", dtype=torch.float32)
    gen = Generator.for_base(base.model, GeneratorConfig(seed=3, pairing="next"))
    model = AdaptedModel(base, gen, chunk_tokens=TEST_CHUNK)
    name = next(iter(gen.shapes))
    adapter, layer = gen.adapter(name), base.model.get_submodule(name)
    captured = []
    hook = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        state, _ = model.encode(DOCUMENT)
    finally:
        hook.remove()
    lengths = [len(c) for c in chunked(token_stream(model.tokenizer, DOCUMENT), TEST_CHUNK)]
    rows = [row for x in captured for row in x]  # chunk batches are right-padded
    assert len(rows) == len(lengths) > 1
    expected = torch.zeros(gen.config.r1, gen.config.r2, dtype=torch.float64)
    norm = adapter.norm.double()
    p = len(model.encoding_prefix)  # each chunk is read after the prefix, which enters no sum
    for row, n in zip(rows, lengths):
        h = row[p : p + n].double()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + adapter.eps) * norm
        k, v = h @ adapter.Wk.double().T, h @ adapter.Wv.double().T
        expected += k[:-1].T @ v[1:]
    torch.testing.assert_close(state.sums[name].double(), expected, atol=1e-3, rtol=1e-4)


def test_pairing_survives_save_and_load_and_bad_pairing_is_rejected(tmp_path):
    base = load_base(None, device="cpu", dtype=torch.float32)
    gen = Generator.for_base(base.model, GeneratorConfig(pairing="next")).randomize_(seed=1)
    gen.save_pretrained(tmp_path / "g", base.fingerprint)
    loaded = Generator.from_pretrained(tmp_path / "g", base.fingerprint)
    assert loaded.config.pairing == "next"
    assert all(layer.pairing == "next" for layer in loaded.layers.values())
    assert loaded.fingerprint() == gen.fingerprint()
    meta = json.loads((tmp_path / "g" / "config.json").read_text())
    meta["config"]["pairing"] = "previous"
    (tmp_path / "g" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GeneratorFormatError, match="pairing"):
        Generator.from_pretrained(tmp_path / "g", base.fingerprint)
    with pytest.raises(ValueError, match="pairing"):
        GeneratorConfig(pairing="previous")
    with pytest.raises(ValueError, match="pairing"):
        loaded.set_pairing("previous")


def test_state_sums_stay_float32_under_a_bfloat16_autocast():
    # Training runs its passes under a bf16 autocast; the K^T V sums must not: a bf16 state
    # rounds away the weak directions a float32 inference state keeps (issue 24, defect 1).
    from genadapter.head import HeadAdapter, HeadConfig

    gen = Generator(GeneratorConfig(r1=8, r2=8), {"layer": (32, 32)}).randomize_(seed=3)
    head = HeadAdapter(32, HeadConfig(r1=8, r2=8), torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    x, e = torch.randn(2, 40, 32, generator=g) * 3, torch.randn(2, 40, 32, generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    exact = gen.layers["layer"].kv_sums(x, mask), head.kv_sums(x, e, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = gen.layers["layer"].kv_sums(x, mask), head.kv_sums(x, e, mask)
        bf16 = x.bfloat16().mT @ x.bfloat16()  # what the autocast does to a bare matmul
    assert bf16.dtype == torch.bfloat16  # (the autocast is on)
    for a, b in zip(exact, trained, strict=True):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_truncated_generator_keeps_its_top_directions_through_save_and_load(tmp_path):
    # GeneratorConfig.keep (issue 24, defect 2): S_hat from the top `keep` directions, saved
    # with the generator; a config without it hashes as before (saved sessions stay bound).
    from genadapter.state import AdapterState, normalize_svd

    config = GeneratorConfig(r1=8, r2=8, keep=2)
    gen = Generator(config, {"layer": (32, 32)}).randomize_(seed=3)
    S = torch.randn(8, 8, generator=torch.Generator().manual_seed(6))
    state = AdapterState({"layer": S}, tokens=10, chunks=1, documents=1)
    s_hat = gen.normalized(state)["layer"]
    assert torch.equal(s_hat, normalize_svd(S, keep=2))
    assert torch.linalg.matrix_rank(s_hat) == 2
    gen.save_pretrained(tmp_path / "g", "base")
    loaded = Generator.from_pretrained(tmp_path / "g", "base")
    assert loaded.config.keep == 2 and loaded.fingerprint() == gen.fingerprint()
    assert "keep" not in GeneratorConfig(r1=8, r2=8).to_dict()
    with pytest.raises(ValueError, match="keep"):
        GeneratorConfig(r1=8, r2=8, keep=9)


def test_residual_keys_read_the_stream_entering_the_block(reference, tmp_path):
    # kv_source="residual" (the paper's geometry): keys and values of every adapted layer of
    # block i come from the hidden states entering block i, checked against the plain
    # transformers model's hidden_states[i] (no hooks of ours) chunk by chunk.
    from genadapter.layers import block_index

    base = load_base(None, device="cpu", dtype=torch.float32)
    config = GeneratorConfig(seed=3, kv_source="residual")
    gen = Generator.for_base(base.model, config)
    model = AdaptedModel(base, gen, chunk_tokens=TEST_CHUNK)
    state, _ = model.encode(DOCUMENT)
    assert not model.binding.block_inputs  # each block's input is let go when the block is done
    chunks = list(chunked(token_stream(model.tokenizer, DOCUMENT), TEST_CHUNK))
    p = model.encoding_prefix
    names = ["model.layers.3.self_attn.o_proj", "model.layers.7.mlp.down_proj"]
    assert gen.adapter(names[1]).Wk.shape[1] == base.model.config.hidden_size  # not its 1,536
    for name in names:
        adapter, i = gen.adapter(name), block_index(name)
        expected = torch.zeros(config.r1, config.r2, dtype=torch.float64)
        for chunk in chunks:
            with torch.no_grad():
                out = reference(torch.tensor([p + chunk]), output_hidden_states=True)
            h = out.hidden_states[i][0, len(p) :].double()
            h = (
                h
                * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + adapter.eps)
                * adapter.norm.double()
            )
            expected += (h @ adapter.Wk.double().T).T @ (h @ adapter.Wv.double().T)
        torch.testing.assert_close(state.sums[name].double(), expected, atol=1e-3, rtol=1e-4)
    # Saved and loaded, the generator keeps its geometry; the default config hashes as before.
    gen.save_pretrained(tmp_path / "g", base.fingerprint)
    loaded = Generator.from_pretrained(tmp_path / "g", base.fingerprint)
    assert loaded.config.kv_source == "residual" and loaded.fingerprint() == gen.fingerprint()
    assert "kv_source" not in GeneratorConfig().to_dict()
    with pytest.raises(ValueError, match="kv_source"):
        GeneratorConfig(kv_source="output")
