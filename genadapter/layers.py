"""Adapted linear layers: the frozen base matmul plus each sequence's own low-rank delta, and the
capture of K^T V sums during a context pass."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import kernels
from .generator import Generator, LayerAdapter, find_targets
from .head import HEAD_NAME
from .library.routing import Routes, input_sum, mixed_down


@dataclass
class Binding:
    """What the adapted layers do in the current forward pass; shared by all of them.

    s_hat:      layer name -> (b, r1, r2) normalized state of each sequence in the batch, or None
                (then every layer is exactly the base layer).
    sums:       when not None, each layer adds its per-sequence K^T V (b, r1, r2) here.
    token_mask: (b, t) 1 for real tokens, 0 for padding, used when capturing.
    folded:     set by AdaptedModel.bind_states when every row has the same state: layer name ->
                alpha S_hat^T A (r2, d_in), the delta's down-projection made once per state, so a
                no-grad forward runs two thin matmuls per layer instead of three (folded_linear).
    batched:    set by bind_states for rows with distinct states: no-grad forwards take
                batched_linear (A and B shared, one batched matmul over the rows' S_hat).
    Without either, or with gradients enabled, the delta is the generator's own code.
    routes:     layer name -> Routes: each token mixes its top-k documents of a library
                (library/routing.py, routed_linear); takes precedence over s_hat.
    input_sums: when not None during a capture, each layer adds the sum of its inputs over the
                real tokens (d_in,) here: a library document's gates (library/folder.py).
    on_hidden:  when not None during a capture, called with each batch's token ids (b, t), its
                token mask (b, t) and the base's last hidden states (b, t, d) (model.py): a
                library document's lexical embedding (library.embedding.LexicalBag).
    block_inputs: during a capture with a generator whose keys and values come from the residual
                stream (GeneratorConfig.kv_source), decoder block index -> the hidden states
                (b, t, d) entering that block, set by inject's hooks.
    """

    s_hat: dict[str, torch.Tensor] | None = None
    sums: dict[str, torch.Tensor] | None = None
    token_mask: torch.Tensor | None = None
    folded: dict[str, torch.Tensor] | None = None
    batched: bool = False
    routes: dict[str, Routes] | None = None
    input_sums: dict[str, torch.Tensor] | None = None
    on_hidden: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)


class AdaptedLinear(nn.Module):
    def __init__(self, name: str, base: nn.Module, adapter: LayerAdapter, binding: Binding):
        super().__init__()
        self.name = name
        self.block = block_index(name)
        self.base = base
        # Held outside the module tree on purpose: the generator's parameters belong to the
        # generator (saved, trained and moved with it), not to the frozen base model.
        self.__dict__["adapter"] = adapter
        self.__dict__["binding"] = binding

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base layer's weight (transformers reads it, e.g. the tied LM head's)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.binding
        if b.routes is not None and b.sums is None:
            return routed_linear(x, self.base, b.routes[self.name], self.adapter.B)
        if b.s_hat is not None and b.sums is None:
            if (b.folded is not None or b.batched) and not torch.is_grad_enabled():
                if b.folded is not None:
                    return folded_linear(x, self.base, b.folded[self.name], self.adapter.B)
                return batched_linear(x, self.base, self.adapter, b.s_hat[self.name])
            fused = fused_decode(x, self.base, self.adapter, b.s_hat[self.name])
            if fused is not None:
                return fused
        y = self.base(x)
        if b.sums is not None:
            source = x if self.adapter.kv_source == "input" else b.block_inputs[self.block]
            kv = kv_sums(source, self.adapter, b.token_mask)
            b.sums[self.name] = b.sums[self.name] + kv if self.name in b.sums else kv
            if b.input_sums is not None:
                xs = input_sum(x, b.token_mask)
                b.input_sums[self.name] = b.input_sums.get(self.name, 0) + xs
        if b.s_hat is not None:
            y = y + lowrank_delta(x, self.adapter, b.s_hat[self.name]).to(y.dtype)
        return y


class AdaptedHead(AdaptedLinear):
    """The LM head with a HeadAdapter: its delta acts on the head's input, W (x + D x), a
    low-rank update W D of W. Its state is captured by the context pass (model.py), not here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s_hat = self.binding.s_hat
        if s_hat is None:
            return self.base(x)
        return self.base(x + lowrank_delta(x, self.adapter, s_hat[self.name]).to(x.dtype))


def lowrank_delta(x: torch.Tensor, adapter: LayerAdapter, s_hat: torch.Tensor) -> torch.Tensor:
    """The one place the delta is computed: the CUDA kernels on a GPU when they are built,
    otherwise (and always on the CPU) the generator's own PyTorch code."""
    if x.is_cuda and kernels.backend() != "reference":
        return kernels.lowrank_delta(x, adapter.A, adapter.B, s_hat, adapter.alpha)
    return adapter.delta(x, s_hat)


def folded_linear(
    x: torch.Tensor, base: nn.Module, down: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """W x + B (down x) for every row: x (..., d_in), down (r2, d_in) from LayerAdapter.fold,
    B (d_out, r2).

    Equals base(x) + lowrank_delta(x, adapter, s_hat) up to float rounding (the product
    S_hat^T A is taken once instead of per token); returned in base(x)'s dtype."""
    return _add_up(base(x), torch.nn.functional.linear(x.to(down.dtype), down), B, 1.0)


def batched_linear(
    x: torch.Tensor, base: nn.Module, adapter: LayerAdapter, s_hat: torch.Tensor
) -> torch.Tensor:
    """W x + alpha B (S_hat_i^T (A x_i)) row by row: x (b, t, d_in), s_hat (b, r1, r2) float32.

    The same sum as lowrank_delta in four operations (A and B applied to all rows at once, one
    batched matmul for the states, the up-projection accumulated into the base output), for
    rows with distinct states, where per-row folds would read b times more weights."""
    z = torch.nn.functional.linear(x.to(adapter.A.dtype), adapter.A) @ s_hat
    return _add_up(base(x), z, adapter.B, adapter.alpha)


def routed_linear(
    x: torch.Tensor, base: nn.Module, routes: Routes, B: torch.Tensor
) -> torch.Tensor:
    """W x + B (sum_j w_j D_{i_j} x): each token's own top-k documents of a library
    (routing.mixed_down), x (..., d_in), B (d_out, r2); returned in base(x)'s dtype.

    With one document its weight is exactly 1, so this is folded_linear under that document."""
    return _add_up(base(x), mixed_down(x, routes), B, 1.0)


def _add_up(y: torch.Tensor, z: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """y + alpha z B^T, accumulated in place into y (a fresh base output) when dtypes allow."""
    if y.dtype == z.dtype == B.dtype and y.is_contiguous():
        y.view(-1, y.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), B.T, alpha=alpha)
        return y
    return y + (alpha * (z @ B.T)).to(y.dtype)


def kv_sums(x: torch.Tensor, adapter: LayerAdapter, token_mask: torch.Tensor | None):
    """The context pass's K^T V sums, dispatched like lowrank_delta."""
    # The fused kernel pairs each token with itself; other pairings run as plain matmuls.
    if x.is_cuda and kernels.backend() != "reference" and adapter.pairing == "same":
        return kernels.kv_sums(x, adapter.norm, adapter.Wk, adapter.Wv, token_mask, adapter.eps)
    return adapter.kv_sums(x, token_mask)


def fused_decode(
    x: torch.Tensor, base: nn.Module, adapter: LayerAdapter, s_hat: torch.Tensor
) -> torch.Tensor | None:
    """Base matmul and delta in one pass over an NF4 weight (decode on a GPU), or None when
    that path does not apply."""
    weight = kernels.fused_nf4_weight(base, x, adapter.A, adapter.B, s_hat)
    if weight is None:
        return None
    return kernels.nf4_lowrank_linear(
        x, weight, base.bias, adapter.A, adapter.B, s_hat, adapter.alpha
    )


def inject(model: nn.Module, generator: Generator) -> Binding:
    """Replace every target layer of `model` by an AdaptedLinear; returns their shared Binding."""
    binding = Binding()
    targets = find_targets(model, generator.config.targets)
    if set(targets) != set(generator.shapes):
        raise ValueError("the generator was built for other layers than this model's targets")
    for name, module in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, AdaptedLinear(name, module, generator.adapter(name), binding))
    if generator.head is not None:
        head = model.get_output_embeddings()
        model.set_output_embeddings(AdaptedHead(HEAD_NAME, head, generator.head, binding))
    if generator.config.kv_source == "residual":
        _capture_block_inputs(model, binding, {block_index(name) for name in targets})
    return binding


def block_index(name: str) -> int | None:
    """The decoder block a module belongs to ("model.layers.12.self_attn.o_proj" -> 12)."""
    found = re.search(r"\.layers\.(\d+)\.", f".{name}.")
    return int(found.group(1)) if found else None


def _capture_block_inputs(model: nn.Module, binding: Binding, blocks: set[int | None]) -> None:
    """During a capture (binding.sums set), keep the hidden states entering each block in
    `blocks` in binding.block_inputs, for the adapted layers whose keys read the residual
    stream. Raises ValueError when a target is in no decoder block."""
    if None in blocks:
        raise ValueError("keys from the residual stream need targets inside decoder blocks")
    for name, module in model.named_modules():
        found = re.search(r"(?:^|\.)layers\.(\d+)$", name)  # the block itself
        index = int(found.group(1)) if found else None
        if found and index in blocks:

            def keep(module, args, kwargs, index=index):
                if binding.sums is not None:
                    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                    binding.block_inputs[index] = hidden

            def drop(module, args, output, index=index):  # the block is done: free its input
                binding.block_inputs.pop(index, None)

            module.register_forward_pre_hook(keep, with_kwargs=True)
            module.register_forward_hook(drop)


@contextmanager
def bound(binding: Binding, **fields):
    """Set fields of the binding for the duration of a forward pass, then clear them."""
    old = {k: getattr(binding, k) for k in fields}
    for k, v in fields.items():
        setattr(binding, k, v)
    try:
        yield binding
    finally:
        for k, v in old.items():
            setattr(binding, k, v)
