"""`genadapter bench` part 5 (and `genadapter bench --library` alone): what decoding with an adapter
library costs. Per-token latency of top-k routing over N stored states (PHATGOOSE-style,
library/routing.py: every token of every adapted layer scores N gates and mixes its k best
documents' folded deltas) against the same decoding loop with one bound state (the folded path of a
session), measured side by side in one process, alternating, best of `repeats`. Issue 14 asks for at
most 1.3x at N = 128, k = 2.

The N stored states are synthetic but made from the generator: a few real states (and their
gates, the documents' mean layer inputs) absorbed from generated prose, repeated to N with small
Gaussian perturbations so that no two are equal. This is fair for a cost measurement: what a
routed decode step does (N gate scores per layer, a top-k, k folded deltas of r2 x d_in floats
applied, a weighted sum) depends on N, k, r2 and d_in, never on the values; which k documents win
changes only which rows are read. Absorbing 128 real documents (minutes on a CPU) would measure the
same thing. The quality of routing is the `library` eval suite's job (eval/library_suite.py)."""

from __future__ import annotations

import time

import torch

from ..layers import bound
from ..library.embedding import encode_with_means
from ..library.routing import Routes, standardize
from ..model import AdaptedModel
from ..state import AdapterState
from .kit import bench_text, header, part_report, timed_greedy

# Real states the synthetic library is made from, and their perturbation (relative to each
# tensor's standard deviation).
REAL_STATES = 4
REAL_TOKENS = 128
JITTER = 0.1


def real_states(
    model: AdaptedModel, count: int, tokens: int = REAL_TOKENS, seed: int = 4
) -> list[tuple[AdapterState, dict[str, torch.Tensor]]]:
    """`count` states absorbed from `tokens` tokens of generated prose each, with their gates as
    Library.add makes them (layer name -> (d_in,) float32 mean layer input)."""
    ids = bench_text(model, count * tokens, seed=seed)
    pieces = [ids[i * tokens : (i + 1) * tokens] for i in range(count)]
    return [encode_with_means(model, model.tokenizer.decode(piece)) for piece in pieces]


def synthetic_routes(
    model: AdaptedModel,
    states: int,
    k: int,
    real_tokens: int = REAL_TOKENS,
    seed: int = 0,
    centred: bool = False,
) -> tuple[dict[str, Routes], AdapterState]:
    """Routes over `states` stored documents (see the module's docstring) and one real state.

    Per adapted layer: gates (N, d_in) standardized, downs (N, r2, d_in) float32 and, when
    `centred` (the library's "centred" gates; its default is "closed"), a centre (d_in,)
    subtracted from every token's input; on the model's device. N r2 sum(d_in) floats in all
    (about 8 MiB per state for the default generator).
    Raises ValueError for states < 1 or k < 1."""
    if states < 1 or k < 1:
        raise ValueError(f"need at least one state and k >= 1 (states={states}, k={k})")
    real = real_states(model, min(states, REAL_STATES), real_tokens)
    folded = [model.generator.folded(s) for s, _ in real]
    g = torch.Generator().manual_seed(seed)

    def jittered(tensors: list[torch.Tensor]) -> torch.Tensor:
        stack = torch.stack([tensors[i % len(tensors)].float().cpu() for i in range(states)])
        noise = torch.randn(stack.shape, generator=g)
        return (stack + JITTER * stack.std() * noise).to(model.device)

    routes = {}
    for name in model.generator.shapes:
        gates = jittered([gate[name] for _, gate in real])
        downs = jittered([f[name] for f in folded])
        center = None
        if centred:  # as "centred" gates (library/gates.py) do; the real gates' mean costs the same
            center = torch.stack([gate[name] for _, gate in real]).mean(0).float()
            center = center.to(model.device)
            gates = gates - center
        routes[name] = Routes(standardize(gates), downs, k, center)
    return routes, real[0][0]


def routed_against_single(
    model: AdaptedModel,
    ids: list[int],
    routes: dict[str, Routes],
    state: AdapterState,
    new_tokens: int,
    repeats: int = 2,
) -> dict:
    """Greedy decoding of `new_tokens` tokens after `ids` (end of sequence ignored), routed over
    `routes` and with `state` bound, in the same loop (kit.timed_greedy), alternating; also
    with no state, for scale. Returns milliseconds per token after the first, best of `repeats`,
    and routed / one state. Raises ValueError when new_tokens < 2 (no token after the first)."""
    if new_tokens < 2:
        raise ValueError("the per-token time needs at least two new tokens")
    runs: dict[str, list[float]] = {"one_state": [], "routed": [], "no_state": []}
    # With repeats > 1 a first, short round warms the paths up; best-of already discards one.
    for warm in [True] * (repeats > 1) + [False] * repeats:
        n = 2 if warm else new_tokens
        one = timed_greedy(model, ids, state, n).per_token
        with bound(model.binding, routes=routes):
            routed = timed_greedy(model, ids, None, n).per_token
        none = timed_greedy(model, ids, None, n).per_token
        if not warm:
            runs["one_state"].append(one)
            runs["routed"].append(routed)
            runs["no_state"].append(none)
    best = {key: min(v) for key, v in runs.items()}
    return {
        "ms_per_token": {key: 1000 * v for key, v in best.items()},
        "routed_over_one_state": best["routed"] / best["one_state"],
    }


def bench_library(
    model: AdaptedModel,
    states: int = 128,
    k: int = 2,
    new_tokens: int = 16,
    repeats: int = 2,
    prompt_tokens: int = 48,
    real_tokens: int = REAL_TOKENS,
) -> dict:
    """Part 5 of `genadapter bench`: top-k routing over `states` stored states against one bound
    state, per decoded token, after `prompt_tokens` tokens of generated prose (as part 2's
    prompt). JSON-ready dict; its "seconds" include making the states."""
    start = time.perf_counter()
    routes, state = synthetic_routes(model, states, k, real_tokens)
    ids = bench_text(model, prompt_tokens, seed=1)
    out = {
        "states": states,
        "k": k,
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "routes_bytes": sum(r.downs.nbytes + r.gates.nbytes for r in routes.values()),
    }
    out.update(routed_against_single(model, ids, routes, state, new_tokens, repeats))
    out["seconds"] = time.perf_counter() - start
    return out


def format_library(r: dict) -> list[str]:
    """The report lines of part 5."""
    ms = r["ms_per_token"]
    return [
        f"5. library: top-{r['k']} routing over {r['states']} stored states vs one bound state "
        f"({r['new_tokens']} tokens after {r['prompt_tokens']})",
        f"   routed {ms['routed']:.1f} ms/token, one state {ms['one_state']:.1f} ms, no state "
        f"{ms['no_state']:.1f} ms  routed / one state {r['routed_over_one_state']:.3f}  "
        f"(stacked deltas {r['routes_bytes'] / 2**20:.0f} MiB)",
    ]


def bench_library_at(model: AdaptedModel, s) -> dict:
    """bench_library at a run.BenchSize `s`: its library_* fields, decode_tokens and repeats."""
    return bench_library(
        model,
        s.library_states,
        s.library_k,
        s.decode_tokens,
        s.repeats,
        real_tokens=s.library_real_tokens,
    )


def run(model: AdaptedModel, s) -> dict:
    """Part 5 alone (`genadapter bench --library`) at a run.BenchSize `s`, with the same header
    fields as bench.run_bench; JSON-ready."""
    return {**header(model), "library": bench_library_at(model, s)}


def format_report(r: dict) -> str:
    """The report of `run`: a header line and part 5's lines."""
    return part_report(r, "library", format_library(r["library"]))
