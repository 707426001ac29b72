"""Reading the context memory: the chunks one turn reads, laid out as a prompt would lay them out.

A turn's sequence is [header][memory][rest]: the header is the conversation's chat template up
to the first user message's content (or, for raw text, the prefix the chunks were encoded after),
the memory the selected chunks end to end in absorb order, the rest the user's content (after
SEPARATOR) and everything after it. Each chunk's keys were rotated at the positions they were
encoded at (prefix_len + i); here every chunk is turned by one constant angle to where it lands
(RoPE composes: R(a) R(b) = R(a + b)), so with the default header the first chunk is read
exactly as computed when prompting. The memory goes into the KV cache between the header's
prefill and the rest's (generation.prefill): every attention layer reads it in the same softmax
as the conversation's own tokens, and the header never sees it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .memory import ContextMemory

# Between the memory and the user's text, as a prompt would put a blank line after a document.
SEPARATOR = "\n\n"


@dataclass
class MemoryRead:
    """The memory one turn reads: keys and values (L, H, M, D) in the base's dtype on its device,
    rotated for a header of `header_len` tokens; `chunks` the memory's chunk indices read."""

    keys: torch.Tensor
    values: torch.Tensor
    header_len: int
    chunks: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]


@dataclass
class Layout:
    """One sequence to prefill: header ids, the memory read after them (or None) and the rest."""

    header: list[int]
    read: MemoryRead | None
    rest: list[int]

    def __len__(self) -> int:
        return len(self.header) + (self.read.tokens if self.read else 0) + len(self.rest)


def rotate(model, keys: torch.Tensor, shift: int | torch.Tensor) -> torch.Tensor:
    """keys (..., T, D) rotated by `shift` positions with the base's rotary embedding: one int
    for every token, or a (T,) tensor of one shift per token."""
    rotary = model.base.model.rotary_emb
    position = torch.as_tensor(shift, device=keys.device).reshape(1, -1)
    cos, sin = rotary(keys.float(), position)  # (1, 1 or T, D), scaled by attention_scaling
    scale = getattr(rotary, "attention_scaling", 1.0)
    cos, sin = cos[0] / scale, sin[0] / scale  # the stored keys already carry the scaling
    k = keys.float()
    half = k.shape[-1] // 2
    rotated_half = torch.cat([-k[..., half:], k[..., :half]], -1)
    return (k * cos + rotated_half * sin).to(keys.dtype)


def assemble(model, memory: ContextMemory, chunks: list[int], header_len: int) -> MemoryRead:
    """Dequantize and rotate `chunks` of `memory` to follow a header of `header_len` tokens.
    Cost: one pass over the chosen chunks' keys and values."""
    dtype, device = model.base.dtype, model.device
    keys, values, start = [], [], header_len
    for i in chunks:
        c = memory.chunks[i]
        k, v = c.dequantized(torch.float32)
        k, v = k.to(device), v.to(device)
        shift = start - (memory.prefix_len + c.offset)
        keys.append((rotate(model, k, shift) if shift else k).to(dtype))
        values.append(v.to(dtype))
        start += c.tokens
    return MemoryRead(torch.cat(keys, 2), torch.cat(values, 2), header_len, tuple(chunks))
