"""The truncated polar factor of an adapter state and its gradient.

GenerativeAdapter (Chen et al., arXiv 2411.05877) normalizes a state S = U diag(sig) V^T to its
polar factor and keeps only the top directions: S_hat = U_k V_k^T over the `k` largest singular
values (the paper keeps r/8 of r = 1024 with `svd_lowrank`), so the many weak directions a long
context's noise fills get no weight. state.normalize_svd calls this for keep < min(r1, r2); the
full factor (every direction) is state._PolarFactor.

The gradient is that of a spectral function F(S) = U diag(g(sig)) V^T with g = 1 on the kept
directions and 0 on the others (the standard result for functions of singular values, e.g.
Lewis & Sendov 2005). With N = U^T G V for the incoming gradient G, the gradient in the singular
basis is A * sym(N) + B * skew(N), where

    A_ij = (g_i - g_j) / (sig_i - sig_j)    (nonzero only across the cut: a kept and a dropped)
    B_ij = (g_i + g_j) / (sig_i + sig_j)

plus the components outside U's and V's spans, with weight g_i / sig_i. A_ij explodes when the
last kept and the first dropped singular values nearly coincide (which direction is "kept" is then
arbitrary): its gap is floored at GAP_RTOL of the largest singular value, as the full factor's
sums are floored at RANK_RTOL. Training clips the total gradient norm besides."""

from __future__ import annotations

import torch

# Singular values below this fraction of the largest are treated as zero (float32 SVD noise).
RANK_RTOL = 1e-5
# The kept / dropped gap in the gradient is at least this fraction of the largest singular value.
GAP_RTOL = 1e-3


class TopPolarFactor(torch.autograd.Function):
    """U_k V_k^T of S (..., r1, r2) float32 over its `keep` largest singular directions (those
    above RANK_RTOL of the largest), with the gradient described in the module docstring."""

    @staticmethod
    def forward(ctx, S: torch.Tensor, keep: int) -> torch.Tensor:
        # Q is invariant to the scale of S; dividing by max|S| keeps it inside float32 range.
        scale = S.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(S.dtype).tiny)
        U, sig, Vh = torch.linalg.svd(S / scale, full_matrices=False)
        rank = torch.arange(sig.shape[-1], device=sig.device)
        g = ((rank < keep) & (sig > sig[..., :1] * RANK_RTOL)).to(sig.dtype)
        ctx.save_for_backward(U, sig, Vh, g, scale)
        return (U * g.unsqueeze(-2)) @ Vh

    @staticmethod
    def backward(ctx, G: torch.Tensor):
        U, sig, Vh, g, scale = ctx.saved_tensors
        with torch.autocast(U.device.type, enabled=False):
            return _grad(G.to(U.dtype), U, sig, Vh, g) / scale, None


def _grad(G, U, sig, Vh, g):
    V = Vh.mT
    top = sig[..., :1].unsqueeze(-1)
    tiny = torch.finfo(sig.dtype).tiny
    si, sj = sig.unsqueeze(-1), sig.unsqueeze(-2)
    gi, gj = g.unsqueeze(-1), g.unsqueeze(-2)
    gap = (si - sj).abs().clamp_min(top * GAP_RTOL + tiny)
    A = (gi - gj).abs() / gap  # g_i - g_j has the sign of sig_i - sig_j across the cut
    both = (gi + gj) > 0
    B = torch.where(both, (gi + gj) / (si + sj).clamp_min(top * RANK_RTOL + tiny), 0.0)
    N = U.mT @ G @ V
    grad = U @ (A * (N + N.mT) / 2 + B * (N - N.mT) / 2) @ Vh
    # Directions outside the spans of U and V (a rectangular S), weighted g_i / sig_i.
    inv = torch.where(g > 0, g / sig.clamp_min(tiny), 0.0)
    GV = G @ V
    grad = grad + (GV - U @ (U.mT @ GV)) * inv.unsqueeze(-2) @ Vh
    UtG = U.mT @ G
    return grad + U @ (inv.unsqueeze(-1) * (UtG - (UtG @ V) @ Vh))
