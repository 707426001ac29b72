"""The running batch's KV cache and attention mask: rows left-padded to one width, merged, selected
and trimmed. Each function either changes the cache completely or not at all."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad dim 2 (KV cache: batch, heads, time, dim) or dim 1 (mask: batch, time) on the left."""
    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge(
    cache: DynamicCache, mask: torch.Tensor, new_cache: DynamicCache, new_mask: torch.Tensor
) -> torch.Tensor:
    """Append new_cache's rows to `cache`, left-padding the shorter; returns the merged mask.
    `cache` is changed only once every merged tensor exists."""
    width = max(mask.shape[1], new_mask.shape[1])
    merged = []
    for a, b in zip(cache.layers, new_cache.layers):
        keys = torch.cat([left_pad(a.keys, width), left_pad(b.keys, width)])
        values = torch.cat([left_pad(a.values, width), left_pad(b.values, width)])
        merged.append((keys, values))
    merged_mask = torch.cat([left_pad(mask, width), left_pad(new_mask, width)])
    for layer, (keys, values) in zip(cache.layers, merged):
        layer.keys, layer.values = keys, values
    return merged_mask


def select(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep rows `keep` of the cache and drop leading columns only padding uses; returns the
    new mask."""
    cache.batch_select_indices(torch.tensor(keep, device=mask.device))
    mask = mask[keep]
    first = int(mask.any(0).float().argmax())
    if first > 0:
        mask = mask[:, first:]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return mask


def truncate(cache: DynamicCache, width: int) -> None:
    """Drop cache columns past `width`: what a forward that failed midway had appended."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]


def row_cache(cache: DynamicCache, i: int) -> DynamicCache:
    """A one-row cache sharing row i's tensors: a forward on it appends to its own copies only."""
    solo = copy.copy(cache)
    solo.layers = []
    for layer in cache.layers:
        one = copy.copy(layer)
        one.keys, one.values = layer.keys[i : i + 1], layer.values[i : i + 1]
        solo.layers.append(one)
    return solo
