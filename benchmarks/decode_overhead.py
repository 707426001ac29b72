"""Per-token decode latency at batch 1 under a state, by delta path, against an empty session:
many short interleaved rounds, so a shared, noisy CPU affects every path alike.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_overhead.py --rounds 20

Paths (genadapter/layers.py): "folded" (what a session decodes with: alpha S_hat^T A made once
per state, two thin matmuls per adapted layer), "batched" (the distinct-states form, forced on one
row), "reference" (the generator's own delta, three matmuls per layer and token: the path before
issue 16) and "empty" (no state: the base model behind the adapted layers' wrappers). Default
base, float32, a random generator (the cost does not depend on its values), 16 tokens after a
48-token prompt per measurement. Prints the median and best of each and their ratios to empty.

Then the adapted layers alone, which a busy machine disturbs less: the time of one decode step's
worth of adapted-layer forwards (every o_proj and down_proj once, input (b, 1, d_in)) by path,
against the bare base layers, at batch 1, 8 and 32 (distinct states take "batched" beyond 1)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from genadapter.base import load_base
from genadapter.generation import cache_kwargs
from genadapter.generator import Generator, GeneratorConfig
from genadapter.layers import AdaptedLinear, bound
from genadapter.model import AdaptedModel

PATHS = ("empty", "folded", "batched", "reference")


@torch.no_grad()
def per_token(model: AdaptedModel, ids: list[int], state, path: str, n: int) -> float:
    cache = cache_kwargs(model.base, DynamicCache())
    model.fast_delta = path != "reference"
    try:
        with model.bind_states(None if path == "empty" else [state]):
            overrides = {"folded": None, "batched": True} if path == "batched" else {}
            with bound(model.binding, **overrides):
                x = torch.tensor([ids], device=model.device)
                token = model.base(input_ids=x, use_cache=True, **cache).logits[0, -1].argmax()
                start = time.perf_counter()
                for _ in range(n):
                    out = model.base(input_ids=token.view(1, 1), use_cache=True, **cache)
                    token = out.logits[0, -1].argmax()
                return (time.perf_counter() - start) / n
    finally:
        model.fast_delta = True


@torch.no_grad()
def layer_step(model: AdaptedModel, states: list, path: str, reps: int) -> float:
    """Seconds for every adapted layer to run once on a (b, 1, d_in) input, best of 5 x reps."""
    layers = [m for m in model.base.modules() if type(m) is AdaptedLinear]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(len(states), 1, m.base.in_features, generator=g) for m in layers]
    model.fast_delta = path != "reference"
    try:
        with model.bind_states(None if path in ("base", "empty") else states):
            calls = [(m.base if path == "base" else m, x) for m, x in zip(layers, xs)]
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(reps):
                    for f, x in calls:
                        f(x)
                best = min(best, (time.perf_counter() - start) / reps)
            return best
    finally:
        model.fast_delta = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    base = load_base(None, device="cpu", dtype=torch.float32)
    gen = Generator.for_base(base.model, GeneratorConfig(seed=1)).randomize_(seed=2, scale=0.5)
    model = AdaptedModel(base, gen)
    text = open("examples/data/lighthouse.md", encoding="utf-8").read()
    state = model.encode(text[:4000])[0]
    ids = model.tokenizer.encode(text[:400], add_special_tokens=False)[:48]
    runs: dict[str, list[float]] = {k: [] for k in PATHS}
    for r in range(args.rounds):
        for path in PATHS if r % 2 == 0 else PATHS[::-1]:
            runs[path].append(per_token(model, ids, state, path, args.tokens))
    print(f"torch threads {torch.get_num_threads()}, {args.rounds} rounds of {args.tokens} tokens")
    for k in PATHS if args.rounds else ():
        med = {k: statistics.median(v) for k, v in runs.items()}
        best = {k: min(v) for k, v in runs.items()}
        print(
            f"{k:<10} median {1000 * med[k]:6.2f} ms  best {1000 * best[k]:6.2f} ms  ratio to "
            f"empty: median {med[k] / med['empty']:.3f}, best {best[k] / best['empty']:.3f}"
        )
    print("adapted layers alone, one decode step (all 60 once), best of 5:")
    us = lambda seconds: f"{1e6 * seconds:+7.0f}"  # noqa: E731
    for b in (1, 8, 32):
        states = [model.encode(text[100 * i : 100 * i + 100])[0] for i in range(b)]
        t = {k: layer_step(model, states, k, 20) for k in ("base", "empty", "fast", "reference")}
        print(
            f"b={b:<3} base layers {us(t['base'])} us, wrappers (empty) "
            f"{us(t['empty'] - t['base'])} us, delta: {'folded' if b == 1 else 'batched'} "
            f"{us(t['fast'] - t['empty'])} us, reference {us(t['reference'] - t['empty'])} us"
        )


if __name__ == "__main__":
    main()
