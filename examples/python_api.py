"""A short tour of the Python API. Runs in about a minute on a 2-core CPU.

.venv/bin/python examples/python_api.py
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import genadapter

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

DOCUMENT = (Path(__file__).parent / "data" / "lighthouse.md").read_text(encoding="utf-8")

# The embedded default base (SmolLM2-135M-Instruct) and the shipped generator.
# load(base=PATH_OR_GGUF, generator=PATH, device="cuda", dtype=..., chunk_tokens=N) for others.
model = genadapter.load()
print("base:", type(model.base).__name__, "| tokenizer:", type(model.tokenizer).__name__)

# A session holds one user's absorbed context and conversation. Empty, it is the base model.
session = model.session()

# absorb(str): one document. Returns AbsorbStats(tokens, chunks, seconds).
stats = session.absorb(DOCUMENT)
print(f"absorbed {stats.tokens} tokens in {stats.chunks} chunks ({stats.seconds:.1f} s)")

# absorb(iterable of str): one document arriving in pieces, e.g. lines of a file or a network
# stream. The pieces are tokenized and chunked as one text: the state equals the joined text's.
stats = session.absorb(line + "\n" for line in ["Ferry notes.", "The Marigold seats 60."])
print(f"absorbed {stats.tokens} more tokens; the session holds {session.tokens} tokens")

# The state's size is fixed by the generator, however much was absorbed.
print(f"state: {session.nbytes:,} bytes")

# generate: raw continuation, no chat template; greedy unless temperature > 0.
print("generate:", repr(session.generate("The lighthouse stands on", max_new_tokens=16)))

# chat: chat template plus this session's earlier turns; the turn is recorded when complete.
print("chat:", session.chat("Where is the lighthouse?", max_new_tokens=32))
print("chat (stream): ", end="", flush=True)
for piece in session.chat("And who built it?", max_new_tokens=32, stream=True):
    print(piece, end="", flush=True)
print(f"\nturns recorded: {len(session.messages) // 2}")

# score: mean negative log-likelihood per token of a text (lower is better), with or without a
# session's state, and optionally after a prefix that sits in the prompt.
text = "The light shows two white flashes every 12 seconds."
print(f"score, base model:         {model.score(text):.3f}")
print(f"score, with the session:   {model.score(text, session=session):.3f}")
print(f"score, document as prefix: {model.score(text, prefix=DOCUMENT):.3f}")

# save / load_session: one file, DIR/state.safetensors, holding the state and the conversation;
# loading checks the base and generator it was made with.
with tempfile.TemporaryDirectory() as tmp:
    path = session.save(Path(tmp) / "lighthouse")
    restored = model.load_session(Path(tmp) / "lighthouse")
    same = all(restored.state.sums[n].equal(s) for n, s in session.state.sums.items())
    print(f"saved {path.name} ({path.stat().st_size:,} bytes); restored exactly: {same}")
    print(f"restored: {restored.tokens} tokens, {len(restored.messages) // 2} turns")

# reset: forget absorbed documents and the conversation.
session.reset()
print(f"after reset: {session.tokens} tokens, {session.nbytes:,} bytes")
