"""What `make demo` runs: absorb a document into a session, then ask questions about it without
the document in the prompt (the session's context memory is read instead, docs/MEMORY.md), and
compare the session's size with the KV cache the same context would need.

    .venv/bin/python examples/demo.py
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import genadapter

DOCUMENT = Path(__file__).parent / "data" / "lighthouse.md"
MAX_NEW_TOKENS = 48

# (question, what the document says), so a reader can check each answer.
QUESTIONS = [
    ("When was the Vellacourt Head lighthouse first lit?", "22 September 1868"),
    ("Who is the chair of the Vellacourt Head Lighthouse Cooperative?", "Imogen Tarrant"),
    ("How many steps lead to the lamp room of the Vellacourt Head lighthouse?", "142"),
    ("What did fishermen call the Vellacourt Head fog horn?", '"the Old Cow"'),
]


def generator_is_trained(model: genadapter.AdaptedModel) -> bool:
    """A fresh generator has B = 0 everywhere: its sessions answer exactly like the base model."""
    return any(layer.B.any() for layer in model.generator.layers.values())


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = genadapter.load()
    session = model.session()

    print(f"Absorbing {DOCUMENT.name} ({len(DOCUMENT.read_text().split())} words)...")
    stats = session.absorb(DOCUMENT.read_text(encoding="utf-8"), progress=True)
    print(f"absorbed {stats.tokens} tokens in {stats.chunks} chunks, {stats.seconds:.1f} s\n")

    answer_seconds = 0.0
    for question, expected in QUESTIONS:
        print(f"Q: {question}")
        print("A: ", end="", flush=True)
        start = time.perf_counter()
        for piece in session.chat(question, stream=True, max_new_tokens=MAX_NEW_TOKENS):
            print(piece, end="", flush=True)
        answer_seconds += time.perf_counter() - start
        print(f"\n   (the document says: {expected})\n")
        session.messages = []  # independent questions: no earlier turns in the prompt

    kv = model.kv_cache_bytes(stats.tokens)
    print("Figures")
    print(f"  tokens absorbed      {stats.tokens}")
    print(f"  chunks               {stats.chunks} (of up to {model.chunk_tokens} tokens)")
    print(f"  absorb time          {stats.seconds:.1f} s")
    print(
        f"  answer time          {answer_seconds:.1f} s for {len(QUESTIONS)} answers "
        f"(at most {MAX_NEW_TOKENS} new tokens each)"
    )
    print(f"  adapter state        {session.state.nbytes:,} bytes (fixed, whatever is absorbed)")
    print(
        f"  context memory       {session.memory_bytes:,} bytes for {session.memory_tokens} "
        f"tokens ({model.memory_storage}; a turn reads at most {model.memory_budget})"
    )
    print(
        f"  KV cache, same text  {kv:,} bytes "
        f"({model.base.config.num_hidden_layers} layers, {model.base.dtype})"
    )
    print(f"  KV cache / session   {kv / session.nbytes:.1f}x")
    if not generator_is_trained(model):
        print(
            "\nNote: the answers come from the session's context memory (the document's own keys "
            "and values,\nread as a prompt would read it). The generator is untrained (B = 0), so "
            "the adapter half of the\nsession changes nothing yet; pass a trained one to "
            "genadapter.load(generator=PATH)."
        )


if __name__ == "__main__":
    main()
