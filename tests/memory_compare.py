"""Comparing two sessions' context memories chunk by chunk (the memory's unit: a chunk, or a block
of one) in the tests of Ray absorb and merging."""

from __future__ import annotations

import torch


def assert_same_memory(got, want, tol: float = 0.0) -> None:
    """The same chunks in the same order, each from the same document: equal token counts and
    lexical ids, and keys / values equal (int8 storage: bit for bit, with their scales within
    `tol` relative; float storage: within `tol`, relative to the largest magnitude)."""
    assert got is not None and want is not None
    assert (got.prefix_len, got.storage, got.documents) == (
        want.prefix_len,
        want.storage,
        want.documents,
    )
    assert len(got.chunks) == len(want.chunks) and got.tokens == want.tokens
    assert got.nbytes == want.nbytes
    for i, (a, b) in enumerate(zip(got.chunks, want.chunks)):
        assert (a.document, a.tokens) == (b.document, b.tokens), i
        assert getattr(a, "offset", 0) == getattr(b, "offset", 0), i  # where a block starts
        assert torch.equal(a.lexical_ids, b.lexical_ids), i
        assert torch.allclose(a.lexical_weights, b.lexical_weights, rtol=1e-4, atol=1e-4), i
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert x.dtype == y.dtype and x.shape == y.shape, i
            if x.dtype == torch.int8:
                assert torch.equal(x, y), i
            else:
                assert (x - y).abs().max() <= tol * y.abs().max(), i
        for x, y in ((a.key_scale, b.key_scale), (a.value_scale, b.value_scale)):
            assert (x is None) == (y is None), i
            if x is not None:
                assert (x.float() - y.float()).abs().max() <= tol * y.float().abs().max(), i
