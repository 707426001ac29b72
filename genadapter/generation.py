"""Decoding: prefill (a layout's memory written into the KV cache between its header and the
rest), a KV-cached token loop under a bound state, sampling, and incremental detokenization with
stop strings."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .memory_read import Layout
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


def _left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def prefill(model, layouts: list[Layout], cache: DynamicCache, logits_to_keep: int = 1):
    """Run the prompts `layouts` (one per row, each under the states already bound) into `cache`:
    headers first, then each row's memory written into the cache after its header, then the
    rests. Rows are left-padded at each stage; padding is masked and positions count real slots
    only, so each row computes what it would alone (memory_read.py). Returns (attention mask
    (b, total) long, logits (b, kept, vocab) of the rests' last `logits_to_keep` tokens, 0 for
    all). Raises ValueError when a row has no rest tokens. The base and a loaded generator are
    frozen, so it builds no graph unless the bound states carry one (training's complement
    stage, training/complement.py, backpropagates through it)."""
    if any(not layout.rest for layout in layouts):
        raise ValueError("every row needs at least one token after its memory")
    dev, pad = model.device, model.tokenizer.pad_token_id
    kw = cache_kwargs(model.base, cache)
    mask = torch.zeros((len(layouts), 0), dtype=torch.long, device=dev)
    if any(layout.read is not None for layout in layouts):
        ids, mask = _left_padded([layout.header for layout in layouts], pad, dev)
        if ids.shape[1]:
            model.base.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                use_cache=True,
                **kw,
            )
        width = max(layout.read.tokens if layout.read else 0 for layout in layouts)
        L, H, D = model.memory_shape
        k = torch.zeros((len(layouts), L, H, width, D), dtype=model.base.dtype, device=dev)
        v = torch.zeros_like(k)
        slots = torch.zeros((len(layouts), width), dtype=torch.long, device=dev)
        for i, layout in enumerate(layouts):
            if layout.read is not None:
                m = layout.read.tokens
                k[i, :, :, :m], v[i, :, :, :m] = layout.read.keys, layout.read.values
                slots[i, :m] = 1
        for layer in range(L):
            cache.update(k[:, layer], v[:, layer], layer)
        mask = torch.cat([mask, slots], 1)
    ids, rest_mask = _left_padded([layout.rest for layout in layouts], pad, dev)
    mask = torch.cat([mask, rest_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1] :]
    out = model.base(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **kw,
    )
    return mask, out.logits


@torch.no_grad()
def generate_ids(model, prompt: list[int] | Layout, state, params: SamplingParams) -> Iterator[int]:
    """Yield new token ids until max_new_tokens or an end-of-sequence token. `prompt` is token
    ids, or a Layout that reads a session's memory (memory_read.py)."""
    if params.max_new_tokens == 0:
        return
    rng = None
    if params.temperature > 0:
        rng = torch.Generator(device=model.device)
        rng.manual_seed(params.seed if params.seed is not None else torch.seed())
    eos = _eos_ids(model)
    raw = DynamicCache()
    cache = cache_kwargs(model.base, raw)
    if isinstance(prompt, Layout) and prompt.read is None:
        prompt = prompt.header + prompt.rest  # nothing to read: the plain prompt, one forward
    with model.bind_states([state]):
        if isinstance(prompt, Layout):
            _, logits = prefill(model, [prompt], raw)
        else:
            ids = torch.tensor([prompt], device=model.device)
            logits = model.base(input_ids=ids, use_cache=True, **cache).logits
        for produced in range(1, params.max_new_tokens + 1):
            token = sample(logits[0, -1], params, rng)
            if token in eos:
                return
            yield token
            if produced == params.max_new_tokens:
                return
            ids = torch.tensor([[token]], device=model.device)
            logits = model.base(input_ids=ids, use_cache=True, **cache).logits


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
    model, prompts: list[list[int] | Layout], states: list, params: list[SamplingParams]
) -> Iterator[list[tuple[int, int]]]:
    """Decode several sequences, each under its own state and sampling parameters (and, for a
    Layout prompt, reading its own memory), in one forward per step. Yields, per step, (sequence
    index, token) for sequences still running.

    Prompts are left-padded; positions count real tokens only, so every sequence decodes as it
    would alone (up to float rounding of the batched matmuls)."""
    n = len(prompts)
    if not n == len(states) == len(params):
        raise ValueError("prompts, states and params must have the same length")
    layouts = [p if isinstance(p, Layout) else Layout([], None, list(p)) for p in prompts]
    pad = model.tokenizer.pad_token_id
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
    if not any(running):
        return
    raw = DynamicCache()
    cache = cache_kwargs(model.base, raw)
    with model.bind_states(states):
        mask, logits = prefill(model, layouts, raw)
        positions = mask.sum(-1, keepdim=True) - 1
        while any(running):
            step, next_ids = [], []
            for i in range(n):
                token = pad
                if running[i]:
                    token = sample(logits[i, -1], params[i], rngs[i])
                    if token in eos:
                        running[i], token = False, pad
                    else:
                        step.append((i, token))
                        produced[i] += 1
                        running[i] = produced[i] < params[i].max_new_tokens
                next_ids.append(token)
            if step:
                yield step
            if not any(running):
                return
            ids = torch.tensor(next_ids, device=model.device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=mask.device)], 1)
            positions = positions + 1
            logits = model.base(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache
            ).logits
