"""`genadapter bench` part 6 (and `genadapter bench --memory` alone): what the context memory
(genadapter/memory.py) costs, measured side by side in one process on one model (issue 23, item 5).

1. bytes per absorbed token: the same text absorbed into an int8 and a float memory, against a
   KV cache of its tokens in the base's dtype (model.kv_cache_bytes) and in bfloat16
   (2 bytes x keys and values x layers x KV heads x head dim per token). Exact, not timed.
2. for memories of N absorbed tokens (the size's list, plus the reading budget and 4x the budget):
   the tokens a question actually reads (at most the budget: a lexical search over the question
   picks the chunks), time to the first token of that question (search, dequantize and rotate,
   prefill of the conversation, all after absorbing) and the per-token decode time, against
   prompting with the same N tokens (the first question recomputing the whole prompt, and decode
   continuing a KV cache of the context prefilled once and reused) and against the bare model
   (the question alone). Prompting cannot hold more than the window: "n/a" past it, and at the
   window it keeps the context's most recent tokens that fit with the question.

All timings are greedy, `decode_tokens` tokens (end of sequence ignored), no adapter state bound
(the memory's cost alone; part 2 times the adapter's), the conditions alternating, best of
`repeats`. The question asks about the first document of the text, so past the budget the search
must find it among all chunks."""

from __future__ import annotations

import random
import time

import torch
from transformers import DynamicCache

from ..eval.prompts import chat_ids, chat_message
from ..generation import cache_kwargs, prefill
from ..memory import STORAGES, ContextMemory
from ..memory_read import Layout
from ..model import AdaptedModel
from ..session import Session
from .kit import Timing, bench_text, clock, crop, header, part_report, timed_greedy

OTHER_QUESTION = "What did the expedition find?"  # ends the prefix a prompt's KV cache can reuse
DECODE_LIMIT = 1.1  # issue 23: memory decode at most 1.1x prompting with a reused KV cache
FLAT_LIMIT = 1.3  # past the budget: cost at 4x the budget at most 1.3x the cost at the budget
BYTES_LIMIT = 0.52  # int8 memory at most 0.52 of a bfloat16 KV cache's bytes


def memory_text(model: AdaptedModel, tokens: int, seed: int = 6) -> tuple[list[int], str]:
    """`tokens` ids of generated prose whose first document is about an invented entity, and a
    question about that entity."""
    from ..eval.fictional import NameMaker, entity_document

    rng = random.Random(f"bench-memory:{seed}")
    document, questions = entity_document(NameMaker(rng), rng)
    rest = model.tokenizer.decode(bench_text(model, tokens, seed=seed))
    ids = model.tokenizer.encode(f"{document}\n\n{rest}", add_special_tokens=False)
    return ids[:tokens], questions[0].text


def memory_bytes(model: AdaptedModel, text: str) -> dict:
    """Bytes per absorbed token of `text` in each storage, and of KV caches of its tokens."""
    memories = {s: ContextMemory(len(model.encoding_prefix), s) for s in STORAGES}
    for memory in memories.values():
        model.encode(text, memory=memory)
    tokens = memories["int8"].tokens
    layers, heads, head_dim = model.memory_shape
    bf16 = 2 * 2 * layers * heads * head_dim * tokens
    out = {
        "tokens": tokens,
        "blocks": len(memories["int8"].chunks),  # the stored units: int8 keys' scales are per block
        "float_dtype": str(model.base.dtype).removeprefix("torch."),
        "bytes": {
            "int8": memories["int8"].nbytes,
            "float": memories["float"].nbytes,
            "kv_cache": model.kv_cache_bytes(tokens),
            "kv_cache_bf16": bf16,
        },
    }
    out["bytes_per_token"] = {k: v / tokens for k, v in out["bytes"].items()}
    out["int8_over_bf16"] = out["bytes"]["int8"] / bf16
    out["float_over_kv_cache"] = out["bytes"]["float"] / out["bytes"]["kv_cache"]
    return out


@torch.no_grad()
def timed_read(
    model: AdaptedModel, memory: ContextMemory, question: str, new_tokens: int
) -> tuple[Timing, Layout]:
    """Greedy decoding of exactly `new_tokens` tokens answering `question` with `memory` read
    (Session.chat_layout, generation.prefill into a DynamicCache, then one-token steps as
    generate_ids runs them), from a fresh session so nothing of an earlier read is reused.
    Returns the timing (ttft: layout and prefill) and the layout read."""
    session = Session(model, memory=memory)
    cache = DynamicCache()
    kw = cache_kwargs(model.base, cache)
    tokens = []
    with model.bind_states([None]):
        start = clock(model)
        layout = session.chat_layout([{"role": "user", "content": question}], new_tokens)
        _, logits = prefill(model, [layout], cache)
        token = logits[0, -1].argmax()
        first = clock(model)
        for _ in range(new_tokens - 1):
            tokens.append(token)
            token = model.base(input_ids=token.view(1, 1), use_cache=True, **kw).logits[0, -1]
            token = token.argmax()
        end = clock(model)
    done = [int(t) for t in [*tokens, token]]
    timing = Timing(first - start, (end - first) / max(new_tokens - 1, 1), done, cache)
    return timing, layout


def _best(timings: list[Timing], prompt_tokens: int) -> dict:
    """Best TTFT and per-token time; prompt_tokens: what the first decoded token attends to."""
    return {
        "ttft_ms": 1000 * min(t.ttft for t in timings),
        "ms_per_token": 1000 * min(t.per_token for t in timings),
        "prompt_tokens": prompt_tokens,
    }


def memory_row(
    model: AdaptedModel, ids: list[int], question: str, new_tokens: int, repeats: int
) -> dict:
    """One memory size: absorb `ids` (as text), then the three conditions side by side."""
    tok = model.tokenizer
    context = tok.decode(ids)
    session = model.session()
    start = clock(model)
    session.absorb(context)
    absorb_s = clock(model) - start
    bare_ids = chat_ids(tok, chat_message(question))
    prompt_ids, prefix, prefix_cache, prefill_s, kept = None, 0, None, 0.0, 0
    if len(ids) <= model.max_positions:
        fit = model.max_positions - len(bare_ids) - new_tokens - 8
        kept = min(len(ids), fit)
        text = context if kept == len(ids) else tok.decode(ids[-kept:])
        prompt_ids = chat_ids(tok, chat_message(question, text))
        other = chat_ids(tok, chat_message(OTHER_QUESTION, text))
        prefix = next(i for i, (a, b) in enumerate(zip(prompt_ids, other)) if a != b)
        start = clock(model)
        prefix_cache = timed_greedy(model, prompt_ids[:prefix], None, 1).cache
        prefill_s = clock(model) - start
    runs: dict[str, list[Timing]] = {"memory": [], "prompt_cached": [], "prompt": [], "bare": []}
    for r in range(repeats):
        timing, layout = timed_read(model, session.memory, question, new_tokens)
        runs["memory"].append(timing)
        if prompt_ids is not None:
            runs["prompt_cached"].append(
                timed_greedy(model, prompt_ids[prefix:], None, new_tokens, prefix_cache)
            )
            crop(prefix_cache, prefix)  # back to the context alone for the next question
            if r == 0 or len(prompt_ids) <= 2048:  # recomputing a long prompt: once
                runs["prompt"].append(timed_greedy(model, prompt_ids, None, 1))
        runs["bare"].append(timed_greedy(model, bare_ids, None, new_tokens))
    row = {
        "tokens": len(ids),
        "memory_tokens": session.memory_tokens,
        "memory_bytes": session.memory_bytes,
        "read_tokens": layout.read.tokens if layout.read is not None else 0,
        "absorb_seconds": absorb_s,
        "memory": _best(runs["memory"], len(layout)),
        "bare": _best(runs["bare"], len(bare_ids)),
        "prompt": None,
    }
    if prompt_ids is not None:
        cached = _best(runs["prompt_cached"], len(prompt_ids))
        row["prompt"] = {
            "context_tokens": kept,
            "prompt_tokens": len(prompt_ids),
            "reused_prefix_tokens": prefix,
            "prefix_prefill_seconds": prefill_s,
            "ttft_ms": 1000 * min(t.ttft for t in runs["prompt"]),
            "cached_ttft_ms": cached["ttft_ms"],
            "ms_per_token": cached["ms_per_token"],
        }
    mem = row["memory"]["ms_per_token"]
    row["memory_over_bare"] = mem / row["bare"]["ms_per_token"]
    row["memory_over_prompt_cached"] = (
        mem / row["prompt"]["ms_per_token"] if row["prompt"] is not None else None
    )
    return row


def bench_memory(
    model: AdaptedModel,
    tokens: tuple[int, ...],
    budget: int | None,
    new_tokens: int,
    repeats: int,
) -> dict:
    """Part 6 for memories of `tokens` absorbed tokens plus the budget and 4x the budget; the
    turn's budget is `budget` (None: the model's memory_budget), at least one stored block (a
    smaller budget reads nothing). JSON-ready."""
    if model.memory_storage is None:
        raise ValueError("the model keeps no context memory (genadapter.load(memory=None))")
    block = min(model.chunk_tokens, model.memory_block)
    budget = max(budget or model.memory_budget, block)
    sizes = sorted({*tokens, budget, 4 * budget})
    started = time.perf_counter()
    all_ids, question = memory_text(model, max(sizes))
    saved = model.memory_budget
    model.memory_budget = budget
    try:
        stored = memory_bytes(model, model.tokenizer.decode(all_ids[:budget]))
        rows = [memory_row(model, all_ids[:n], question, new_tokens, repeats) for n in sizes]
    finally:
        model.memory_budget = saved
    at = {r["tokens"]: r["memory"]["ms_per_token"] for r in rows}
    prompted = [r["memory_over_prompt_cached"] for r in rows if r["prompt"] is not None]
    checks = {
        "int8_over_bf16": stored["int8_over_bf16"],
        "decode_over_prompt_cached": max(prompted) if prompted else None,
        "cost_4x_budget_over_budget": at[4 * budget] / at[budget],
    }
    limits = {
        "int8_over_bf16": BYTES_LIMIT,
        "decode_over_prompt_cached": DECODE_LIMIT,
        "cost_4x_budget_over_budget": FLAT_LIMIT,
    }
    return {
        "storage": model.memory_storage,
        "budget": budget,
        "window": model.max_positions,
        "chunk_tokens": model.chunk_tokens,
        "question": question,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "bytes": stored,
        "rows": rows,
        "acceptance": {
            k: {"value": v, "limit": limits[k], "met": v is not None and v <= limits[k]}
            for k, v in checks.items()
        },
        "seconds": time.perf_counter() - started,
    }


def bench_memory_at(model: AdaptedModel, s) -> dict:
    """bench_memory at a run.BenchSize `s`: its memory_* fields and decode_tokens."""
    return bench_memory(model, s.memory_tokens, s.memory_budget, s.decode_tokens, s.memory_repeats)


def _ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1f} ms" if x < 1000 else f"{x / 1000:.2f} s"


def format_memory(r: dict) -> list[str]:
    b = r["bytes"]
    per = b["bytes_per_token"]
    lines = [
        f"6. context memory ({r['storage']} storage, reads at most {r['budget']} tokens a turn, "
        f"window {r['window']})",
        f"   bytes per absorbed token ({b['tokens']} tokens): int8 {per['int8']:.0f}, float "
        f"({b['float_dtype']}) {per['float']:.0f}, KV cache {b['float_dtype']} "
        f"{per['kv_cache']:.0f}, KV cache bfloat16 {per['kv_cache_bf16']:.0f}; int8 / bf16 KV "
        f"{b['int8_over_bf16']:.3f}",
        f"   per token: {r['new_tokens']} greedy tokens; TTFT: the first question after absorbing",
        "   memory    read  decode ms/token: memory  prompt+cache  bare   TTFT: memory   "
        "prompt  prompt+cache   absorb",
    ]
    for row in r["rows"]:
        p = row["prompt"] or {}
        lines.append(
            f"   {row['memory_tokens']:>6}  {row['read_tokens']:>6}  "
            f"{row['memory']['ms_per_token']:>20.1f}  "
            f"{_ms(p.get('ms_per_token')).removesuffix(' ms'):>12}  "
            f"{row['bare']['ms_per_token']:>5.1f}  {_ms(row['memory']['ttft_ms']):>13}  "
            f"{_ms(p.get('ttft_ms')):>7}  {_ms(p.get('cached_ttft_ms')):>12}  "
            f"{row['absorb_seconds']:>6.2f} s"
        )
    lines.append("   acceptance (issue 23):")
    for name, check in r["acceptance"].items():
        value = "n/a" if check["value"] is None else f"{check['value']:.3f}"
        met = "met" if check["met"] else "NOT met"
        lines.append(f"     {name} {value} (at most {check['limit']}): {met}")
    return lines


def run(model: AdaptedModel, s) -> dict:
    """Part 6 alone (`genadapter bench --memory`) at a run.BenchSize `s`, with the same header
    fields as bench.run_bench; JSON-ready."""
    return {**header(model), "memory": bench_memory_at(model, s)}


def format_report(r: dict) -> str:
    """The report of `run`: a header line and part 6's lines."""
    return part_report(r, "memory", format_memory(r["memory"]))
