"""Per-token routing among many absorbed documents (PHATGOOSE, Muqeeth et al., ICML 2024, arXiv
2402.05859), with gates made in closed form from each document alone.

Every document of a library is an expert: its state gives, per adapted layer, the folded
down-projection D_i = alpha S_hat_i^T A (r2 x d_in; the up-projection B is the generator's, shared
by all documents). Its gate g_i (d_in) is the mean of the inputs that layer saw while the document
was absorbed (captured in the same context pass: Binding.input_sums, genadapter/layers.py).

At decode, for each token's layer input x, as PHATGOOSE does with its trained gates:
    s_i = <std(x - m), std(g_i - m)> / sqrt(d_in)     std: zero mean, unit variance over d_in
(m: an optional fixed background per layer, the same for every document: gates.py)
    top-k of s, w = softmax over those k
    y = W x + B (sum_j w_j D_{i_j} x)
Since B is shared, the mixture is taken in the r2-dimensional space before B: one base matmul and
one up-projection per token, whatever the number of documents."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Variance floor of the standardization (a constant vector has none).
STD_EPS = 1e-6


@dataclass
class Routes:
    """One adapted layer's library, ready for routed_linear (genadapter/layers.py).

    gates: (N, d_in) float32, standardized (`standardize`) gate of each of the N documents.
    downs: (N, r2, d_in) float32, alpha S_hat_i^T A of each document (Generator.folded).
    k:     documents mixed per token (at most N are used).
    center: (d_in,) float32 background subtracted from each token's input before it is
           standardized (the gates were made with the same subtracted), or None."""

    gates: torch.Tensor
    downs: torch.Tensor
    k: int
    center: torch.Tensor | None = None


def standardize(v: torch.Tensor) -> torch.Tensor:
    """(v - mean) / std over the last dimension, in float32; finite for a constant v."""
    v = v.float()
    v = v - v.mean(-1, keepdim=True)
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + STD_EPS)


def route(
    x: torch.Tensor, gates: torch.Tensor, k: int, center: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k documents: x (..., d_in), gates (N, d_in) standardized, center (d_in,)
    float32 subtracted from x first when given.

    Returns softmax weights (..., k') float32 and document indices (..., k') int64, k' = min(k, N),
    best first. Raises ValueError when k < 1 or there are no gates."""
    n, d = gates.shape
    if k < 1 or n == 0:
        raise ValueError(f"routing needs k >= 1 and at least one document (k={k}, N={n})")
    x = x.float() if center is None else x.float() - center
    # The gates' rows have zero mean, so <x - mean(x), g> = <x, g>: only x's scale is needed.
    var, _ = torch.var_mean(x, dim=-1, correction=0, keepdim=True)
    scores = (x @ gates.T) * (torch.rsqrt(var + STD_EPS) / d**0.5)
    top, index = scores.topk(min(k, n), dim=-1)
    return torch.softmax(top, dim=-1), index


def mixed_down(x: torch.Tensor, routes: Routes) -> torch.Tensor:
    """sum_j w_j D_{i_j} x per token: x (..., d_in) -> (..., r2) float32.

    One token on the CPU (decode at batch 1) reads its k documents' D in place; a few tokens gather
    theirs (k r2 d_in reads per token); many tokens (a prompt) run one matmul against all N
    documents' D and pick each token's k rows, which reads every D once instead of once per
    token."""
    weights, index = route(x, routes.gates, routes.k, routes.center)
    n, r2, d = routes.downs.shape
    xf = x.to(routes.downs.dtype)
    if index.numel() == index.shape[-1] and xf.device.type == "cpu":  # one token; on a GPU the
        # .tolist() would wait for the device at every layer, so it gathers as for a few tokens
        chosen, w = index.reshape(-1).tolist(), weights.reshape(-1, 1)
        out = w[0] * torch.nn.functional.linear(xf, routes.downs[chosen[0]])
        for j in range(1, len(chosen)):
            out.add_(torch.nn.functional.linear(xf, routes.downs[chosen[j]]), alpha=w[j].item())
        return out
    if index.numel() < n:
        return torch.einsum("...d,...krd,...k->...r", xf, routes.downs[index], weights)
    every = torch.nn.functional.linear(xf, routes.downs.reshape(n * r2, d)).unflatten(-1, (n, r2))
    picked = every.gather(-2, index.unsqueeze(-1).expand(*index.shape, r2))
    return (picked * weights.unsqueeze(-1)).sum(-2)


def input_sum(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of a layer's inputs over the real tokens: x (b, t, d_in), token_mask (b, t) of 0/1 or
    None -> (d_in,) float32. Divided by the token count, the document's gate."""
    x = x.float()
    if token_mask is not None:
        x = x * token_mask.unsqueeze(-1).to(x.dtype)
    return x.sum(dim=tuple(range(x.dim() - 1)))
