"""SVD normalization and the saved-state format, on random matrices (no model needed)."""

import json
import logging
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from genadapter.state import AdapterState, CorruptStateError, atomic_write, normalize_svd


def singular_values(x):
    return torch.linalg.svdvals(x.double())


@pytest.mark.parametrize("shape", [(32, 32), (8, 5), (5, 8)])
def test_random_state_has_unit_singular_values(shape):
    torch.manual_seed(0)
    S = torch.randn(*shape) * 37.0
    sv = singular_values(normalize_svd(S))
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-5)


def test_normalized_is_polar_factor():
    # U V^T is the orthogonal matrix closest to S; for symmetric positive definite S it is I.
    torch.manual_seed(1)
    X = torch.randn(6, 6, dtype=torch.float64)
    S = (X @ X.T + 0.5 * torch.eye(6)).float()
    assert torch.allclose(normalize_svd(S), torch.eye(6), atol=1e-5)


def test_zero_state_gives_zero():
    out = normalize_svd(torch.zeros(16, 16))
    assert torch.equal(out, torch.zeros(16, 16))


def test_rank_one_state_keeps_rank_one():
    torch.manual_seed(2)
    u, v = torch.randn(16, 1), torch.randn(1, 12)
    sv = singular_values(normalize_svd(u @ v * 1e3))
    assert abs(sv[0] - 1) < 1e-5
    assert sv[1:].abs().max() < 1e-5
    # The kept direction is the original one.
    expected = (u / u.norm()) @ (v / v.norm())
    assert torch.allclose(normalize_svd(u @ v), expected, atol=1e-5)


@pytest.mark.parametrize("scale", [1e30, 1e-30, 3e38])
def test_huge_and_tiny_states_stay_finite_and_scale_free(scale):
    torch.manual_seed(3)
    S = torch.randn(8, 8)
    S = S / S.abs().max()  # entries up to `scale`, within float32 range
    out = normalize_svd(S * scale)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, normalize_svd(S), atol=1e-4)


def test_near_degenerate_state_has_finite_value_and_gradient():
    torch.manual_seed(4)
    Q1, _ = torch.linalg.qr(torch.randn(8, 8))
    Q2, _ = torch.linalg.qr(torch.randn(8, 8))
    sig = torch.tensor([5.0, 3.0, 3.0, 3.0 + 1e-7, 1.0, 1.0, 0.5, 0.0])  # ties and a zero
    S = (Q1 @ torch.diag(sig) @ Q2.T).requires_grad_(True)
    out = normalize_svd(S)
    (out * torch.randn(8, 8)).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(S.grad).all()
    sv = singular_values(out)
    assert torch.allclose(sv[:7], torch.ones(7, dtype=torch.float64), atol=1e-4)
    assert sv[7] < 1e-4


def test_nonfinite_state_is_rejected():
    S = torch.ones(4, 4)
    S[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        normalize_svd(S)


@pytest.mark.parametrize("shape", [(5, 5), (6, 4), (4, 6), (3, 3, 3), (2, 5, 5), (2, 6, 4)])
def test_backward_matches_finite_differences(shape):
    # The custom backward (polar-factor derivative) against numerical differentiation.
    torch.manual_seed(5)
    from genadapter.state import _PolarFactor

    S = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_PolarFactor.apply, (S,), eps=1e-6, atol=1e-5)


def random_state(seed=0, tokens=100):
    g = torch.Generator().manual_seed(seed)
    sums = {f"model.layers.{i}.o_proj": torch.randn(8, 8, generator=g) for i in range(3)}
    return AdapterState(sums, tokens=tokens, chunks=2, documents=1)


def _top_k_reference(S: torch.Tensor, k: int) -> torch.Tensor:
    """U_k V_k^T with PyTorch's generic SVD backward (valid while singular values are distinct)."""
    U, _, Vh = torch.linalg.svd(S, full_matrices=False)
    return U[..., :k] @ Vh[..., :k, :]


@pytest.mark.parametrize("shape,k", [((6, 6), 3), ((8, 5), 2), ((5, 8), 4), ((16, 16), 1)])
def test_truncated_factor_and_gradient_match_the_generic_svd(shape, k):
    # Issue 24, defect 2: keep the top k directions (the paper keeps r/8); value and gradient
    # against float64 autograd through torch.linalg.svd on random, well-separated states.
    g = torch.Generator().manual_seed(sum(shape) + k)
    S = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    G = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    ref = S.clone().requires_grad_()
    (_top_k_reference(ref, k) * G).sum().backward()
    ours = S.float().requires_grad_()
    out = normalize_svd(ours, keep=k)
    (out * G.float()).sum().backward()
    torch.testing.assert_close(out.double(), _top_k_reference(S, k), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-4, rtol=1e-4)
    sv = singular_values(out)
    assert torch.allclose(sv[..., :k], torch.ones_like(sv[..., :k]), atol=1e-5)
    assert sv[..., k:].abs().max() < 1e-5  # exactly k directions, each of weight 1


def test_truncation_at_full_rank_is_the_polar_factor():
    S = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(7))
    assert torch.equal(normalize_svd(S, keep=6), normalize_svd(S))
    assert torch.equal(normalize_svd(S, keep=99), normalize_svd(S))
    with pytest.raises(ValueError, match="keep"):
        normalize_svd(S, keep=0)


def test_truncated_gradient_stays_bounded_at_a_degenerate_cut():
    # sig_k == sig_{k+1}: which direction is kept is arbitrary and the exact gradient infinite;
    # the gap is floored (polar.GAP_RTOL) so training sees a large but finite gradient.
    from genadapter.polar import GAP_RTOL

    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(8)))
    S = (q * torch.tensor([5.0, 3.0, 2.0, 2.0, 1.0, 0.5])) @ q.T
    S.requires_grad_()
    normalize_svd(S, keep=3).pow(2).mul(torch.arange(36.0).view(6, 6)).sum().backward()
    assert torch.isfinite(S.grad).all()
    assert S.grad.abs().max() < 100 * 36 / (GAP_RTOL * 5.0)


def test_save_load_round_trip_is_exact(tmp_path):
    state = random_state()
    state.save(tmp_path / "s.safetensors", {"note": "x"})
    loaded, meta = AdapterState.load(tmp_path / "s.safetensors")
    assert meta["note"] == "x" and (loaded.tokens, loaded.chunks, loaded.documents) == (100, 2, 1)
    for name, s in state.sums.items():
        assert torch.equal(loaded.sums[name], s)


def test_truncated_and_corrupt_files_fail_clearly(tmp_path):
    path = tmp_path / "s.safetensors"
    random_state().save(path, {})
    data = path.read_bytes()
    for bad, what in [
        (data[: len(data) // 2], "truncated"),
        (data[:5], "truncated"),
        (b"not a state at all, just text" * 3, "not a genadapter state"),
    ]:
        path.write_bytes(bad)
        with pytest.raises(CorruptStateError, match=what):
            AdapterState.load(path)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # one bit pattern in the tensor data changes
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptStateError, match="checksum"):
        AdapterState.load(path)


META = {
    "base_fingerprint": "abc123",
    "messages": [
        {"role": "user", "content": "Caf\u00e9?"},
        {"role": "assistant", "content": "Yes"},
    ],
    "created": 1700000000.25,
}


def rewrite_meta(path, edit):
    """Re-save `path` as a well-formed safetensors file whose genadapter metadata `edit` changed:
    what someone editing the header (not a random byte) produces."""
    with safe_open(path, "pt") as f:
        header = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    meta = json.loads(header["genadapter"])
    edit(meta)
    header["genadapter"] = json.dumps(meta)
    path.write_bytes(st_save(tensors, metadata=header))


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(tokens=0),  # loaded as an empty session before
        lambda m: m.update(tokens=m["tokens"] + 1),
        lambda m: m.update(chunks=3),
        lambda m: m.update(documents=0),
        lambda m: m["messages"][1].update(content="No"),
        lambda m: m["messages"].pop(),
        lambda m: m.update(created=0.0),
        lambda m: m.update(base_fingerprint="abc124"),
        lambda m: m.update(extra="field"),
    ],
)
def test_edited_metadata_is_refused(tmp_path, edit):
    path = tmp_path / "s.safetensors"
    random_state().save(path, META)
    rewrite_meta(path, edit)
    with pytest.raises(CorruptStateError, match="checksum mismatch"):
        AdapterState.load(path)


def test_every_single_bit_flip_is_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    random_state().save(path, META)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    # Every bit of the length and the header (metadata, checksum, tensor table); one bit of every
    # byte of the tensor data.
    positions = [(i, bit) for i in range(8 + n) for bit in range(8)]
    positions += [(i, i % 8) for i in range(8 + n, len(data))]
    loaded = []
    for i, bit in positions:
        flipped = bytearray(data)
        flipped[i] ^= 1 << bit
        try:
            AdapterState.from_bytes(bytes(flipped))  # what load() does with the file's bytes
            loaded.append((i, bit))
        except CorruptStateError:
            pass
    assert loaded == []
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptStateError, match="checksum mismatch"):
        AdapterState.load(path)


def test_format_1_files_still_load(tmp_path, caplog):
    # Format 1 kept a checksum of the sums alone inside the metadata.
    state = random_state()
    meta = dict(META, format="genadapter-state/1", tokens=100, chunks=2, documents=1)
    tensors = {n: s.contiguous() for n, s in state.sums.items()}
    path = tmp_path / "old.safetensors"
    path.write_bytes(st_save(tensors, {"genadapter": json.dumps(dict(meta, checksum="0" * 64))}))
    with pytest.raises(CorruptStateError, match="checksum"):
        AdapterState.load(path)
    meta["checksum"] = state.checksum()
    path.write_bytes(st_save(tensors, {"genadapter": json.dumps(meta)}))
    with caplog.at_level(logging.WARNING, logger="genadapter.state"):
        loaded, got = AdapterState.load(path)
    assert "save it again" in caplog.text
    assert loaded.checksum() == state.checksum() and got["messages"] == META["messages"]
    loaded.save(path, got)  # saving again writes the current format, which covers the metadata
    assert AdapterState.load(path)[1]["format"] == "genadapter-state/2"


def test_atomic_write_keeps_old_file_when_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "s.bin"
    atomic_write(path, b"old")

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp file left behind


def test_add_is_a_sum():
    a, b = random_state(1, 10), random_state(2, 20)
    total = a.clone().add_(b)
    assert total.tokens == 30 and total.documents == 2
    for name in a.sums:
        assert torch.equal(total.sums[name], a.sums[name] + b.sums[name])
    assert a.nbytes == total.nbytes == 3 * 8 * 8 * 4
