"""`genadapter bench`: what absorbing context into parameters costs and saves, as ratios of
measurements taken side by side in one process (same model, same inputs, alternating runs, best of
`repeats`), so a busy or slow machine changes the figures less than the ratios.

1. absorb: tokens/s of Session.absorb over tokens/s of a plain no-grad forward of the frozen base's
   body (what absorb runs; it skips the LM head) over the same chunks. 1.0 is the limit.
2. decode: per-token latency of a session with a state, the same with the generator's reference
   delta (three matmuls per layer and token, the path before the folded one), an empty session
   (all through the library's decoding loop) and the unwrapped path (the base called directly).
3. against prompting, for contexts of 512, 2K and 8K tokens: time to the first token of a question
   and decode tokens/s with the context absorbed, in the prompt recomputed per question, and in the
   prompt with its prefix KV cache reused; memory of the state against the KV cache.
4. batches of N sessions with distinct states decoded together (generate_batch) against the same
   batch with no states, and with the reference delta.
5. an adapter library: decode with top-k routing over many stored states against one bound state
   (library.py; `genadapter bench --library` runs this part alone).
6. the context memory: bytes per absorbed token (int8, float, a KV cache), decode per token and
   time to first token with 512 / 2K / 8K / 32K memory tokens against prompting with a reused KV
   cache of the same tokens and the bare model (memory.py; `genadapter bench --memory`).

Runs unchanged on CUDA (timings synchronize the device)."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..generation import SamplingParams, generate_batch, generate_ids
from ..model import AdaptedModel
from ..state import AdapterState
from ..text import chunked, token_stream
from .kit import Timing, bench_text, clock, crop, header, kv_bytes, timed_greedy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSize:
    absorb_chunks: int  # chunks of model.chunk_tokens for the absorb measurement
    decode_tokens: int  # tokens decoded per latency measurement
    contexts: tuple[int, ...]  # context lengths compared with prompting
    batch_sizes: tuple[int, ...]  # sessions decoded together
    batch_tokens: int
    repeats: int  # best of this many runs of the short measurements
    library_states: int = 128  # stored states routed over (part 5)
    library_k: int = 2  # documents mixed per token
    library_real_tokens: int = 128  # tokens absorbed per real state the stored ones are made from
    # Part 6: memories of these absorbed tokens, plus the budget and 4x the budget (memory.py)
    memory_tokens: tuple[int, ...] = (512, 2048, 8192, 32768)
    memory_budget: int | None = None  # tokens a turn reads (None: the model's)
    memory_repeats: int = 3


SIZES = {
    "default": BenchSize(8, 16, (512, 2048, 8192), (1, 8, 32), 16, 2),
    "quick": BenchSize(
        2,
        6,
        (128,),
        (1, 4),
        4,
        1,
        library_states=2,
        library_real_tokens=16,
        memory_tokens=(),
        memory_budget=64,
        memory_repeats=1,
    ),
}
QUESTION = "Which company built the harbour crane, and in which year?"


def _chat_ids(model: AdaptedModel, context: str | None) -> list[int]:
    from ..eval.runner import chat_ids, chat_message

    return chat_ids(model.tokenizer, chat_message(QUESTION, context))


def _best(runs: list[float]) -> float:
    return min(runs)


# -- 1. absorb throughput ------------------------------------------------------------------------


@torch.no_grad()
def bench_absorb(model: AdaptedModel, size: BenchSize) -> dict:
    n = model.chunk_tokens
    text = model.tokenizer.decode(bench_text(model, size.absorb_chunks * n))
    # The very chunks absorb makes of the text, each after the encoding prefix, batched and
    # right-padded as absorb does: the ratio is the adapter sums' and memory's overhead.
    chunks = list(chunked(token_stream(model.tokenizer, text), n))
    batches = [
        _padded(model, chunks[i : i + model.chunk_batch])
        for i in range(0, len(chunks), model.chunk_batch)
    ]
    forward_tokens = sum(map(len, chunks))
    absorb_runs, forward_runs, tokens = [], [], 0
    model.base.base_model(input_ids=batches[0][0][:1, :16])  # warm up
    for _ in range(size.repeats):
        session = model.session()
        start = clock(model)
        tokens = session.absorb(text).tokens
        absorb_runs.append(clock(model) - start)
        start = clock(model)
        for ids, mask in batches:
            model.base.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        forward_runs.append(clock(model) - start)
    absorb_tps = tokens / _best(absorb_runs)
    forward_tps = forward_tokens / _best(forward_runs)
    return {
        "tokens": tokens,
        "forward_tokens": forward_tokens,
        "chunk_tokens": n,
        "prefix_tokens": len(model.encoding_prefix),
        "chunk_batch": model.chunk_batch,
        "absorb_tokens_per_s": absorb_tps,
        "forward_tokens_per_s": forward_tps,
        "ratio": absorb_tps / forward_tps,
    }


def _padded(model: AdaptedModel, chunks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = [model.encoding_prefix + c for c in chunks]
    width = max(map(len, chunks))
    ids = torch.full((len(chunks), width), model.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
    return ids.to(model.device), mask.to(model.device)


# -- 2. decode latency ---------------------------------------------------------------------------


def _library_decode(model: AdaptedModel, ids: list[int], state, n: int) -> float:
    """Seconds per token after the first, through the library's decoding loop."""
    stamps = []
    for _ in generate_ids(model, ids, state, SamplingParams(max_new_tokens=n)):
        stamps.append(clock(model))
    if len(stamps) < 2:
        raise RuntimeError("the model ended its answer before two tokens; use another prompt")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def bench_decode(model: AdaptedModel, size: BenchSize, state: AdapterState) -> dict:
    # A raw prose prompt: a continuation rarely ends early, so every run decodes n tokens.
    ids = bench_text(model, 48, seed=1)
    n = size.decode_tokens
    runs = {"state": [], "state_reference": [], "empty": [], "unwrapped": []}
    for _ in range(size.repeats):
        runs["state"].append(_library_decode(model, ids, state, n))
        with _reference_delta(model):
            runs["state_reference"].append(_library_decode(model, ids, state, n))
        runs["empty"].append(_library_decode(model, ids, model.new_state(), n))
        runs["unwrapped"].append(timed_greedy(model, ids, None, n).per_token)  # the base itself
    best = {k: _best(v) for k, v in runs.items()}
    return {
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "ms_per_token": {k: 1000 * v for k, v in best.items()},
        "state_over_empty": best["state"] / best["empty"],
        "reference_over_empty": best["state_reference"] / best["empty"],
        "state_over_unwrapped": best["state"] / best["unwrapped"],
        "empty_over_unwrapped": best["empty"] / best["unwrapped"],
    }


@contextmanager
def _reference_delta(model: AdaptedModel):
    """Decode with the generator's reference delta instead of the folded / batched one."""
    model.fast_delta = False
    try:
        yield
    finally:
        model.fast_delta = True


# -- 3. against prompting ------------------------------------------------------------------------


def bench_prompting(model: AdaptedModel, size: BenchSize, context_tokens: int) -> dict:
    n = size.decode_tokens
    question_ids = _chat_ids(model, None)
    # Room for the question's template and the answer inside the window.
    fit = model.max_positions - len(question_ids) - n - 8
    ids = bench_text(model, min(context_tokens, fit), seed=2)
    context = model.tokenizer.decode(ids)
    prompt_ids = _chat_ids(model, context)
    # The part of the prompt a prefix cache can reuse: what two different questions share.
    other = chat_ids_with(model, context, "What did the expedition find?")
    prefix = next((i for i, (a, b) in enumerate(zip(prompt_ids, other)) if a != b), len(prompt_ids))
    start = clock(model)
    session = model.session()
    session.absorb(context)
    absorb_s = clock(model) - start
    start = clock(model)
    prefix_cache = timed_greedy(model, prompt_ids[:prefix], None, 1).cache
    prefill_s = clock(model) - start
    cached_kv = kv_bytes(prefix_cache)
    runs: dict[str, list[Timing]] = {"adapter": [], "prompt": [], "prompt_cached": []}
    for _ in range(size.repeats if context_tokens <= 2048 else 1):
        runs["adapter"].append(timed_greedy(model, question_ids, session.state, n))
        runs["prompt"].append(timed_greedy(model, prompt_ids, None, n))
        runs["prompt_cached"].append(
            timed_greedy(model, prompt_ids[prefix:], None, n, prefix_cache)
        )
        crop(prefix_cache, prefix)  # back to the shared prefix for the next question
    out = {
        "context_tokens": len(ids),
        "prompt_tokens": len(prompt_ids),
        "question_tokens": len(question_ids),
        "reused_prefix_tokens": prefix,
        "absorb_seconds": absorb_s,
        "prefix_prefill_seconds": prefill_s,
        "state_bytes": session.state.nbytes,  # the adapter alone (part 6: the memory)
        "kv_cache_bytes": cached_kv,
    }
    for k, v in runs.items():
        ttft, per_token = _best([t.ttft for t in v]), _best([t.per_token for t in v])
        out[k] = {"ttft_ms": 1000 * ttft, "decode_tokens_per_s": 1 / per_token}
    # The reused cache must do the same work as recomputing: the same greedy tokens.
    out["cached_matches_recompute"] = runs["prompt"][0].tokens == runs["prompt_cached"][0].tokens
    out["ttft_prompt_over_adapter"] = out["prompt"]["ttft_ms"] / out["adapter"]["ttft_ms"]
    out["ttft_cached_over_adapter"] = out["prompt_cached"]["ttft_ms"] / out["adapter"]["ttft_ms"]
    out["decode_adapter_over_prompt"] = (
        out["adapter"]["decode_tokens_per_s"] / out["prompt"]["decode_tokens_per_s"]
    )
    out["kv_over_state_bytes"] = cached_kv / session.state.nbytes
    return out


def chat_ids_with(model: AdaptedModel, context: str, question: str) -> list[int]:
    from ..eval.runner import chat_ids, chat_message

    return chat_ids(model.tokenizer, chat_message(question, context))


# -- 4. batched sessions -------------------------------------------------------------------------


def _batch_step_seconds(model, prompts, states, tokens: int) -> tuple[float, int]:
    """Seconds per decoding step after the first (prefill) step, and tokens produced."""
    params = [SamplingParams(max_new_tokens=tokens) for _ in prompts]
    stamps, produced = [], 0
    for step in generate_batch(model, prompts, states, params):
        stamps.append(clock(model))
        produced += len(step)
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), produced


def bench_batch(model: AdaptedModel, size: BenchSize) -> list[dict]:
    most = max(size.batch_sizes)
    ids = bench_text(model, most * 48, seed=3)
    # Distinct sessions: each absorbed its own 32 tokens; each continues its own 16-token prompt.
    states = [
        model.encode(model.tokenizer.decode(ids[i * 48 : i * 48 + 32]))[0] for i in range(most)
    ]
    prompts = [ids[i * 48 + 32 : i * 48 + 48] for i in range(most)]
    rows = []
    for n in size.batch_sizes:
        with_states, reference, without = [], [], []
        for _ in range(size.repeats):
            with_states.append(
                _batch_step_seconds(model, prompts[:n], states[:n], size.batch_tokens)
            )
            with _reference_delta(model):
                reference.append(
                    _batch_step_seconds(model, prompts[:n], states[:n], size.batch_tokens)
                )
            without.append(_batch_step_seconds(model, prompts[:n], [None] * n, size.batch_tokens))
        step_s, step0_s = _best([r[0] for r in with_states]), _best([r[0] for r in without])
        step_ref_s = _best([r[0] for r in reference])
        rows.append(
            {
                "sessions": n,
                "tokens_per_s_states": n / step_s,
                "tokens_per_s_reference": n / step_ref_s,
                "tokens_per_s_no_states": n / step0_s,
                "step_ratio": step_s / step0_s,
                "reference_step_ratio": step_ref_s / step0_s,
            }
        )
    return rows


# -- run, report ---------------------------------------------------------------------------------


def run_bench(
    model: AdaptedModel, size: str | BenchSize = "default", progress: bool = True
) -> dict:
    """All six measurements; a JSON-ready dict (part 6 only when the model keeps a memory)."""
    from .library import bench_library_at
    from .memory import bench_memory_at

    size = SIZES[size] if isinstance(size, str) else size
    steps = 5 + len(size.contexts)
    results = {**header(model), "size": asdict(size)}
    start = time.perf_counter()
    with tqdm(total=steps, desc="bench", unit="part", disable=not progress) as bar:
        results["absorb"] = bench_absorb(model, size)
        bar.update()
        state = model.encode(model.tokenizer.decode(bench_text(model, model.chunk_tokens)))[0]
        results["decode"] = bench_decode(model, size, state)
        bar.update()
        results["prompting"] = []
        for tokens in size.contexts:
            results["prompting"].append(bench_prompting(model, size, tokens))
            bar.update()
        results["batch"] = bench_batch(model, size)
        bar.update()
        results["library"] = bench_library_at(model, size)
        bar.update()
        if model.memory_storage is not None:
            results["memory"] = bench_memory_at(model, size)
        bar.update()
    results["seconds"] = time.perf_counter() - start
    return results


def _ms(x: float) -> str:
    return f"{x:.1f} ms" if x < 1000 else f"{x / 1000:.2f} s"


def format_report(r: dict) -> str:
    a, d = r["absorb"], r["decode"]
    ms = d["ms_per_token"]
    lines = [
        f"genadapter bench on {r['device']} ({r['machine']['cpu']}, {r['dtype']}), "
        f"{r['seconds']:.0f} s",
        "",
        "1. absorb vs plain base forward over the same chunks",
        f"   absorb {a['absorb_tokens_per_s']:.0f} tok/s, forward {a['forward_tokens_per_s']:.0f}"
        f" tok/s  ratio {a['ratio']:.2f}  ({a['tokens']} tokens, chunks of {a['chunk_tokens']})",
        "",
        f"2. decode latency per token ({d['new_tokens']} tokens after {d['prompt_tokens']})",
        f"   session with state {ms['state']:.1f} ms (reference delta {ms['state_reference']:.1f}"
        f" ms), empty session {ms['empty']:.1f} ms, unwrapped {ms['unwrapped']:.1f} ms",
        f"   with state / empty {d['state_over_empty']:.3f} (reference delta "
        f"{d['reference_over_empty']:.3f}); ratio to unwrapped: with state "
        f"{d['state_over_unwrapped']:.2f}, empty {d['empty_over_unwrapped']:.2f}",
        "",
        "3. against prompting (time to first token of a question, decode tokens/s, memory)",
        "   context  method          TTFT      decode tok/s  memory      one-time cost",
    ]
    for p in r["prompting"]:
        memory = {"adapter": p["state_bytes"], "prompt": p["kv_cache_bytes"]}
        memory["prompt_cached"] = p["kv_cache_bytes"]
        once = {
            "adapter": f"absorb {p['absorb_seconds']:.2f} s",
            "prompt": "-",
            "prompt_cached": f"prefill {p['prefix_prefill_seconds']:.2f} s",
        }
        for k, label in (
            ("adapter", "absorbed"),
            ("prompt", "prompt"),
            ("prompt_cached", "prompt+cache"),
        ):
            lines.append(
                f"   {p['context_tokens']:>7}  {label:<14}  {_ms(p[k]['ttft_ms']):>8}  "
                f"{p[k]['decode_tokens_per_s']:>12.1f}  {memory[k] / 2**20:>7.2f} MiB  {once[k]}"
            )
        lines.append(
            f"   {'':>7}  ratios: TTFT prompt/absorbed {p['ttft_prompt_over_adapter']:.1f}, "
            f"prompt+cache/absorbed {p['ttft_cached_over_adapter']:.2f}; decode absorbed/prompt "
            f"{p['decode_adapter_over_prompt']:.2f}; KV/state bytes {p['kv_over_state_bytes']:.1f}"
        )
    lines += ["", "4. batched decoding: N sessions with distinct states vs the same batch without"]
    for b in r["batch"]:
        lines.append(
            f"   N={b['sessions']:<3} {b['tokens_per_s_states']:8.1f} tok/s with states, "
            f"{b['tokens_per_s_no_states']:8.1f} without  step time ratio {b['step_ratio']:.3f}"
            f" (reference delta {b['reference_step_ratio']:.3f})"
        )
    if "library" in r:
        from .library import format_library

        lines += ["", *format_library(r["library"])]
    if r.get("memory"):
        from .memory import format_memory

        lines += ["", *format_memory(r["memory"])]
    return "\n".join(lines)
