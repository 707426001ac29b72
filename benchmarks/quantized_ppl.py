"""Perplexity cost of quantizing the frozen base: held-out text scored by the default base in
float32, bfloat16, nf4 and int8 (no session, so this measures the base alone).

Documents are the first test-split documents of a few corpora (genadapter.eval.corpora), each cut to
its first --tokens tokens; every mode scores exactly the same strings with `model.score`. The
perplexity is exp of the token-weighted mean negative log-likelihood. Prints a Markdown table and
writes JSON when --json is given.

    .venv/bin/python benchmarks/quantized_ppl.py --docs 4 --tokens 512
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import platform
import time

import torch
from tqdm.auto import tqdm

import genadapter
from genadapter.eval import corpora
from genadapter.quantize import QUANTIZE_MODES

MODES = {  # name -> load() arguments
    "float32": {"dtype": torch.float32, "quantize": None},
    "bfloat16": {"dtype": torch.bfloat16, "quantize": None},
    "nf4": {"dtype": torch.float32, "quantize": "nf4"},
    "int8": {"dtype": torch.float32, "quantize": "int8"},
}


def held_out_texts(names: list[str], docs: int, tokens: int, tokenizer) -> list[tuple[str, str]]:
    """(corpus, text) pairs: the first `docs` test documents of each corpus, cut to `tokens`."""
    texts = []
    for name in names:
        for _, text in itertools.islice(corpora.documents(name, "test"), docs):
            ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
            texts.append((name, tokenizer.decode(ids)))
    return texts


def decoder_linear_bytes(model) -> int:
    """Bytes of the decoder's linear layers as stored: weights or packed codes, biases, scales."""
    tensors = []
    for module in model.base.base_model.modules():
        if not hasattr(module, "in_features"):
            continue
        tensors += list(module.parameters(recurse=False))
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None:  # nf4: block absmaxes (8-bit when nested) and their own scales
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
        if getattr(weight, "SCB", None) is not None:  # int8: one scale per row
            tensors.append(weight.SCB)
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(mode: str, texts_of, args) -> dict:
    start = time.perf_counter()
    model = genadapter.load(device="cpu", **MODES[mode])
    loaded = time.perf_counter() - start
    stored = decoder_linear_bytes(model)  # before bitsandbytes repacks anything at first use
    texts = texts_of(model.tokenizer)
    model.score(texts[0][1])  # first forward: bitsandbytes repacks its CPU weights here
    nll = {name: [0.0, 0] for name in args.corpora}
    start = time.perf_counter()
    for name, text in tqdm(texts, desc=mode, leave=False):
        n = len(model.tokenizer.encode(text, add_special_tokens=False)) - 1
        nll[name][0] += model.score(text) * n
        nll[name][1] += n
    scored = time.perf_counter() - start
    total = sum(v[0] for v in nll.values()) / sum(v[1] for v in nll.values())
    row = {
        "mode": mode,
        "ppl": {name: math.exp(s / n) for name, (s, n) in nll.items()},
        "ppl_all": math.exp(total),
        "tokens": sum(v[1] for v in nll.values()),
        "decoder_linear_mib": stored / 2**20,
        "load_s": loaded,
        "score_s": scored,
    }
    del model
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=4, help="test documents per corpus")
    parser.add_argument("--tokens", type=int, default=512, help="tokens kept per document")
    parser.add_argument("--corpora", nargs="+", default=["python-docs", "foldoc"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    assert set(QUANTIZE_MODES) <= set(MODES)

    cache: dict[str, list] = {}

    def texts_of(tokenizer):
        if "texts" not in cache:  # every mode shares the tokenizer; cut the texts once
            cache["texts"] = held_out_texts(args.corpora, args.docs, args.tokens, tokenizer)
        return cache["texts"]

    torch.manual_seed(0)
    rows = [measure(mode, texts_of, args) for mode in args.modes]
    base = next((r for r in rows if r["mode"] == "float32"), rows[0])

    print(
        f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; {len(cache['texts'])} documents, {rows[0]['tokens']} tokens\n"
    )
    head = " | ".join(f"PPL {c}" for c in args.corpora)
    print(f"| base | {head} | PPL all | vs {base['mode']} | decoder linears MiB | load s |")
    print("|---" * (5 + len(args.corpora)) + "|")
    for r in rows:
        cells = " | ".join(f"{r['ppl'][c]:.3f}" for c in args.corpora)
        change = 100 * (r["ppl_all"] / base["ppl_all"] - 1)
        print(
            f"| {r['mode']} | {cells} | {r['ppl_all']:.3f} | {change:+.2f}% | "
            f"{r['decoder_linear_mib']:.1f} | {r['load_s']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
