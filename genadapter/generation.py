"""Decoding: a KV-cached token loop under a bound state, sampling, and incremental detokenization
with stop strings."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .text import Detokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(
                f"max_new_tokens must be a non-negative int, got {self.max_new_tokens!r}"
            )
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")


def cache_kwargs(base, cache: DynamicCache) -> dict:
    """The keyword that passes a KV cache to `base`'s forward: recent transformers call it `cache`
    and warn (FutureWarning) when given `past_key_values`, the only name older versions know."""
    return {_cache_keyword(type(base)): cache}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    # Once per model class: decode loops call cache_kwargs every step.
    return (
        "cache"
        if "cache" in inspect.signature(model_class.forward).parameters
        else ("past_key_values")
    )


def sample(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None) -> int:
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=rng))


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], state, params: SamplingParams) -> Iterator[int]:
    """Yield new token ids until max_new_tokens or an end-of-sequence token."""
    if params.max_new_tokens == 0:
        return
    rng = None
    if params.temperature > 0:
        rng = torch.Generator(device=model.device)
        rng.manual_seed(params.seed if params.seed is not None else torch.seed())
    eos = _eos_ids(model)
    cache = cache_kwargs(model.base, DynamicCache())
    ids = torch.tensor([prompt_ids], device=model.device)
    with model.bind_states([state]):
        for _ in range(params.max_new_tokens):
            out = model.base(input_ids=ids, use_cache=True, **cache)
            token = sample(out.logits[0, -1], params, rng)
            if token in eos:
                return
            yield token
            ids = torch.tensor([[token]], device=model.device)


def _eos_ids(model) -> set[int]:
    ids = {model.tokenizer.eos_token_id}
    configured = model.base.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def stream_text(tokenizer, token_ids: Iterable[int], stop: list[str]) -> Iterator[str]:
    """Turn token ids into text pieces as they arrive; stops at the first stop string.

    Holds back an incomplete UTF-8 character (dropped if no later token completes it, e.g. when
    max_new_tokens cuts inside one) and any tail that could still become a stop string, so the
    pieces never hold a character that no token produced and, joined, are the whole answer."""
    detok = Detokenizer(tokenizer)
    tokens = iter(token_ids)
    text = ""
    emitted = 0
    while True:
        token = next(tokens, None)
        final = token is None
        new = detok.finish() if final else detok.add(token)
        if not new and not final:
            continue
        text += new
        cut = min((i for i in (text.find(s, emitted) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = len(text) if final else len(text) - _partial_stop(text, stop)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
        if final:
            return


def _partial_stop(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


@torch.no_grad()
def generate_batch(
    model, prompts: list[list[int]], states: list, params: list[SamplingParams]
) -> Iterator[list[tuple[int, int]]]:
    """Decode several sequences, each under its own state and sampling parameters, in one
    forward per step. Yields, per step, (sequence index, token) for sequences still running.

    Prompts are left-padded; positions count real tokens only, so every sequence decodes as it
    would alone (up to float rounding of the batched matmuls)."""
    n = len(prompts)
    if not n == len(states) == len(params):
        raise ValueError("prompts, states and params must have the same length")
    width = max(map(len, prompts))
    pad = model.tokenizer.pad_token_id
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    rngs = []
    for p in params:
        rng = None
        if p.temperature > 0:
            rng = torch.Generator(device=model.device)
            rng.manual_seed(p.seed if p.seed is not None else torch.seed())
        rngs.append(rng)
    eos = _eos_ids(model)
    running = [p.max_new_tokens > 0 for p in params]
    produced = [0] * n
    cache = cache_kwargs(model.base, DynamicCache())
    with model.bind_states(states):
        while any(running):
            out = model.base(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache
            )
            step, next_ids = [], []
            for i in range(n):
                token = pad
                if running[i]:
                    token = sample(out.logits[i, -1], params[i], rngs[i])
                    if token in eos:
                        running[i], token = False, pad
                    else:
                        step.append((i, token))
                        produced[i] += 1
                        running[i] = produced[i] < params[i].max_new_tokens
                next_ids.append(token)
            if step:
                yield step
            ids = torch.tensor(next_ids, device=model.device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=mask.device)], 1)
            positions = positions[:, -1:] + 1
