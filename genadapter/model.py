"""AdaptedModel, the frozen base with the generator injected, and `load()`: it encodes context into
states and the ContextMemory, and runs forwards in which each row uses its own state."""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from . import kernels
from .base import Base, load_base, pick_device
from .generation import cache_kwargs, prefill
from .generator import Generator, GeneratorConfig
from .head import HEAD_NAME, head_pairs
from .layers import Binding, bound, inject
from .memory import (
    DEFAULT_BLOCK,
    DEFAULT_BUDGET,
    DEFAULT_KEEP,
    DEFAULT_THRESHOLD,
    STORAGES,
    ContextMemory,
    MemoryChunk,
    encoding_prefix,
    lexical_bag,
    quantize_chunk,
)
from .quantize import check_mode, quantize_base
from .session import AbsorbStats, Session
from .state import AdapterState
from .text import chunked, token_stream

log = logging.getLogger(__name__)

# States whose folded deltas (Generator.folded) are kept between forwards, most recently used
# first: a fold is r2 x d_in floats per adapted layer (8 MiB for the default model, 33 times the
# state), so a server holding many sessions keeps only those decoding now.
FOLDED_STATES = 4
# The trained generator for the embedded default base, shipped inside the package.
SHIPPED_GENERATOR = Path(__file__).parent / "checkpoints" / "smollm2-135m-instruct"


def check_memory_reading(budget: int, fraction: float | None, block: int) -> None:
    """Raise ValueError unless budget and block are whole numbers of tokens >= 1 and fraction is
    None or in (0, 1]."""
    for name, value in (("memory_budget", budget), ("memory_block", block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number of tokens, got {value!r}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {fraction!r}")


class AdaptedModel:
    def __init__(
        self,
        base: Base,
        generator: Generator,
        chunk_tokens: int | None = None,
        chunk_batch: int = 4,
        memory: str | None = "int8",
        memory_budget: int = DEFAULT_BUDGET,
        memory_fraction: float | None = None,
        memory_block: int = DEFAULT_BLOCK,
    ):
        check_memory_reading(memory_budget, memory_fraction, memory_block)
        self.base = base.model
        self.tokenizer = base.tokenizer
        self.base_name = base.name
        self.base_fingerprint = base.fingerprint
        self.generator = generator.to(self.device).eval().requires_grad_(False)
        self.generator_fingerprint = generator.fingerprint()
        # Every chunk is encoded after this prefix (the chat header up to the user's content,
        # memory.py), memory or not, so a chunk's adapter sums do not depend on the storage.
        self.encoding_prefix = encoding_prefix(self.tokenizer)
        self.chunk_tokens = chunk_tokens or generator.config.chunk_tokens
        longest = self.max_positions - len(self.encoding_prefix)
        if not 0 < self.chunk_tokens <= longest:
            raise ValueError(f"chunk_tokens must be in 1..{longest} (the window less the prefix)")
        self.chunk_batch = chunk_batch
        self.binding: Binding = inject(self.base, generator)
        # No-grad forwards under bound states take the folded / batched delta (layers.py); False
        # keeps the generator's reference delta (for comparisons: `genadapter bench`).
        self.fast_delta = True
        self._folded: OrderedDict[int, weakref.ref] = OrderedDict()
        if memory not in (None, *STORAGES):
            raise ValueError(f"memory must be None or one of {STORAGES}, got {memory!r}")
        # The context memory (memory.py): how absorbed chunks' keys and values are stored (None:
        # sessions keep no memory) and the reading policy.
        self.memory_storage = memory
        self.memory_budget = memory_budget  # memory tokens a turn reads at most
        self.memory_fraction = memory_fraction  # and at most this share of what it holds
        self.memory_block = memory_block  # tokens per selectable block, set when absorbing
        self.memory_threshold = DEFAULT_THRESHOLD
        self.memory_keep = DEFAULT_KEEP

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def max_positions(self) -> int:
        return self.base.config.max_position_embeddings

    def kv_cache_bytes(self, tokens: int) -> int:
        """Bytes the base's KV cache needs to hold `tokens` tokens of context in the prompt."""
        c = self.base.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim
        return per_token * tokens * self.base.dtype.itemsize

    def new_state(self) -> AdapterState:
        return AdapterState.zeros(self.generator.state_shapes(), self.device)

    def new_memory(self) -> ContextMemory | None:
        """An empty context memory for this model, or None when the model keeps none."""
        if self.memory_storage is None:
            return None
        return ContextMemory(len(self.encoding_prefix), self.memory_storage)

    @property
    def memory_shape(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim) of the base's attention: the memory's per-token shape."""
        c = self.base.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers, c.num_key_value_heads, head_dim

    def session(self) -> Session:
        """A new, empty session: it answers exactly like the base model until it absorbs text."""
        return Session(self)

    def load_session(self, path: str | os.PathLike) -> Session:
        """The session saved at `path` by Session.save (see Session.load for the errors)."""
        return Session.load(self, path)

    # -- context pass ---------------------------------------------------------------------------

    def chunks(self, document: object) -> Iterator[list[int]]:
        """The token chunks of one document (str, bytes, or an iterable of pieces) as absorbing
        reads it: chunk_tokens ids each, the last one shorter, streamed. Raises DocumentError
        (when iterated) for empty or non-text input."""
        return chunked(token_stream(self.tokenizer, document), self.chunk_tokens)

    @torch.no_grad()
    def encode(
        self, document: object, progress: bool = False, memory: ContextMemory | None = None
    ) -> tuple[AdapterState, AbsorbStats]:
        """The state of one document (str, bytes, or an iterable of pieces), on its own; with
        `memory` (an empty ContextMemory of this model), its chunks' keys and values are added
        to it as one document, from the same pass.

        Raises DocumentError for empty or non-text input; nothing else changes in that case."""
        start = time.perf_counter()
        state = self.encode_chunks(self.chunks(document), progress=progress, memory=memory)
        if memory is not None:
            memory.documents, memory.version = 1, memory.version + 1
        state.documents = 1
        return state, AbsorbStats(state.tokens, state.chunks, time.perf_counter() - start)

    @torch.no_grad()
    def encode_chunks(
        self,
        chunks: Iterable[list[int]],
        progress: bool = False,
        memory: ContextMemory | None = None,
    ) -> AdapterState:
        """Sum of the states of token chunks, each encoded independently by the frozen base.

        Chunks run chunk_batch at a time; only the hidden states entering each adapted layer are
        used, folded at once into K^T V sums, so memory is bounded by one chunk batch. Each chunk
        is encoded after the model's encoding_prefix (whose tokens enter no sum); with `memory`,
        its keys and values are also appended to `memory` (document 0)."""
        state = self.new_state()
        batch: list[list[int]] = []
        with tqdm(desc="absorbing", unit="tok", disable=not progress, leave=False) as bar:
            for chunk in chunks:
                if not 0 < len(chunk) <= self.max_positions:
                    raise ValueError(f"a chunk must hold 1..{self.max_positions} tokens")
                batch.append(chunk)
                if len(batch) == self.chunk_batch:
                    self._encode_batch(batch, state, memory)
                    bar.update(sum(map(len, batch)))
                    batch = []
            if batch:
                self._encode_batch(batch, state, memory)
                bar.update(sum(map(len, batch)))
        return state

    def _encode_batch(
        self, chunks: list[list[int]], state: AdapterState, memory: ContextMemory | None = None
    ) -> None:
        prefix = self.encoding_prefix
        p = len(prefix)
        if p + max(map(len, chunks)) > self.max_positions:
            raise ValueError(f"a chunk after the memory prefix must fit {self.max_positions}")
        width = p + max(map(len, chunks))
        ids = torch.full((len(chunks), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunks), width), dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, : p + len(c)] = torch.tensor(prefix + c)
            mask[i, : p + len(c)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        sums: dict[str, torch.Tensor] = {}
        head = self.generator.head
        layer_states = head is not None and head.config.key_layer is not None
        cache = DynamicCache() if memory is not None else None
        # Right padding with a causal mask: real tokens never attend to the padding, and the
        # padding's own keys/values (and the prefix's) are masked out of the sums. The LM head
        # is skipped.
        summed = mask.clone()
        summed[:, :p] = 0
        with bound(self.binding, sums=sums, token_mask=summed):
            out = self.base.base_model(
                input_ids=ids,
                attention_mask=mask,
                use_cache=memory is not None,
                output_hidden_states=layer_states,
                **({} if cache is None else cache_kwargs(self.base, cache)),
            )
        hidden_last = out.last_hidden_state
        if memory is not None:
            self._keep_memory(memory, chunks, cache, hidden_last)
        ids, mask, hidden_last = ids[:, p:], mask[:, p:], hidden_last[:, p:]
        if self.binding.on_hidden is not None:
            self.binding.on_hidden(ids, mask, hidden_last)
        if head is not None:
            hidden = tuple(h[:, p:] for h in out.hidden_states) if layer_states else None
            sums[HEAD_NAME] = head_pairs(self.base, head, ids, mask, hidden_last, hidden)
        for name, s in sums.items():
            state.sums[name] += s.sum(0)
        state.tokens += int(mask.sum())
        state.chunks += len(chunks)

    def _keep_memory(self, memory: ContextMemory, chunks, cache, hidden: torch.Tensor) -> None:
        """Append each chunk's keys and values (from the pass's KV cache, minus the prefix) and
        its lexical bag (the base's surprisal at each of its tokens) to `memory`."""
        p = len(self.encoding_prefix)
        keys = torch.stack([layer.keys for layer in cache.layers], 1)  # (b, L, H, t, D)
        values = torch.stack([layer.values for layer in cache.layers], 1)
        head = self.base.get_output_embeddings()
        for i, c in enumerate(chunks):
            n = len(c)
            k, v = keys[i, :, :, p : p + n], values[i, :, :, p : p + n]
            target = torch.tensor(c, device=hidden.device)
            # Surprisal of each chunk token given what precedes it (the prefix for the first);
            # without a prefix the first token has no prediction and gets the chunk's mean.
            logits = head(hidden[i, max(p - 1, 0) : p + n - 1]).float()
            s = logits.logsumexp(-1) - logits.gather(-1, target[-len(logits) :, None])[:, 0]
            if p == 0:
                s = torch.cat([s.mean()[None] if n > 1 else torch.ones(1, device=s.device), s])
            for at in range(0, n, self.memory_block):
                block = slice(at, at + self.memory_block)
                lex_ids, lex_w = lexical_bag(target[block], s[block])
                kv = quantize_chunk(k[:, :, block], v[:, :, block], memory.storage)
                memory.chunks.append(MemoryChunk(*kv, lex_ids, lex_w, 0, at))

    # -- adapted forward ------------------------------------------------------------------------

    def bind_states(self, states: Sequence[AdapterState | None] | None):
        """Context manager: the next forwards use states[i] for sequence i. None, or all states
        empty, leaves the base model untouched (bit-exact).

        For no-grad forwards the delta is prepared once here: one state for every row is folded
        into LoRA form (Generator.folded, cached on the state), distinct states take the batched
        form (layers.py); the CUDA kernels keep their own fused path."""
        if states is None or all(s is None or s.is_empty for s in states):
            return bound(self.binding, s_hat=None, folded=None, batched=False)
        per_seq = [
            self.generator.normalized(s) if s is not None and not s.is_empty else None
            for s in states
        ]
        s_hat = {}
        for name, (r1, r2) in self.generator.state_shapes().items():
            zero = torch.zeros(r1, r2, device=self.device)
            s_hat[name] = torch.stack([p[name] if p is not None else zero for p in per_seq])
        fast = self.fast_delta and (self.device.type != "cuda" or kernels.backend() == "reference")
        folded = None
        if fast and all(s is states[0] for s in states):
            folded = self._fold(states[0])
        return bound(self.binding, s_hat=s_hat, folded=folded, batched=fast and folded is None)

    def _fold(self, state: AdapterState) -> dict[str, torch.Tensor]:
        """Generator.folded(state), cached on the state for the FOLDED_STATES latest states."""
        folded = self.generator.folded(state)
        self._folded[id(state)] = weakref.ref(state)
        self._folded.move_to_end(id(state))
        while len(self._folded) > FOLDED_STATES:
            old = self._folded.popitem(last=False)[1]()
            if old is not None:
                old.forget("folded")
        return folded

    @torch.no_grad()
    def logits(
        self,
        input_ids: torch.Tensor,
        states: Sequence[AdapterState | None] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with self.bind_states(states):
            return self.base(
                input_ids=input_ids.to(self.device),
                attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                use_cache=False,
            ).logits.float()

    @torch.no_grad()
    def score(self, text: str, session=None, prefix: str | None = None) -> float:
        """Mean negative log-likelihood per token of `text`, after `prefix` when given, under the
        session's state and memory (read as Session.text_layout lays it out, for `prefix`).
        Without a prefix or memory the first token has no context and is not scored."""
        enc = lambda s: self.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        target = enc(text) if isinstance(text, str) else None
        if not target:
            raise ValueError("score needs a non-empty text")
        context = enc(prefix) if prefix else []
        ids = context + target
        if len(ids) > self.max_positions:
            raise ValueError(
                f"prefix + text is {len(ids)} tokens; the window is {self.max_positions}"
            )
        if len(ids) < 2:
            raise ValueError("score needs at least two tokens when no prefix is given")
        if getattr(session, "library", None) is not None:  # a RoutedSession: its own routing
            return session.score(text, prefix)
        state = None if session is None else session.state
        layout = None
        if getattr(session, "memory", None) is not None and not session.memory.is_empty:
            # The memory is read for the prefix (the text scored is not a query), all of it
            # within the budget when there is no prefix.
            layout = session.text_layout(ids, prefix)
        if layout is not None and layout.read is not None:
            with self.bind_states([state]):
                _, logits = prefill(self, [layout], DynamicCache(), logits_to_keep=0)
            logits = logits[0].float()
        else:
            logits = self.logits(torch.tensor([ids]), [state])[0]
        first = max(len(context), 1)
        targets = torch.tensor(ids[first:], device=logits.device)
        return torch.nn.functional.cross_entropy(logits[first - 1 : -1], targets).item()


def load(
    base: str | os.PathLike | None = None,
    generator: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    chunk_tokens: int | None = None,
    chunk_batch: int = 4,
    quantize: str | None = "auto",
    memory: str | None = "int8",
    memory_budget: int = DEFAULT_BUDGET,
    memory_fraction: float | None = None,
    memory_block: int = DEFAULT_BLOCK,
) -> AdaptedModel:
    """Load a frozen base (default: the embedded SmolLM2-135M-Instruct) and a generator.

    `quantize` is "nf4", "int8" or None for the base's decoder layers (bitsandbytes); "auto" means
    nf4 on CUDA and None elsewhere. `memory` is how sessions keep the context memory of what they
    absorb (memory.py, docs/MEMORY.md): "int8" (default), "float" (the base's dtype, exact) or
    None (no memory: sessions hold the adapter state alone). How a turn reads it: at most
    `memory_budget` tokens (default 1024) and, with `memory_fraction`, at most that share of the
    tokens the memory holds (at least one block); `memory_block` is the size in tokens of the
    blocks absorbing stores and a turn selects among (default 128). Raises ValueError for a
    budget or block under 1 or a fraction outside (0, 1]."""
    check_memory_reading(memory_budget, memory_fraction, memory_block)
    if quantize == "auto":
        quantize = "nf4" if pick_device(device).type == "cuda" else None
    check_mode(quantize)
    loaded = load_base(base, device=device, dtype=dtype)
    if quantize is not None:  # before inject(), so the adapted layers wrap the quantized ones
        quantize_base(loaded.model, quantize)
    if generator is None and base is None and (SHIPPED_GENERATOR / "config.json").is_file():
        generator = SHIPPED_GENERATOR
    if generator is not None:
        gen = Generator.from_pretrained(Path(generator), loaded.fingerprint)
    else:
        log.warning(
            "No trained generator for this base: using a fresh one whose B is zero, so a "
            "session's adapter state changes nothing (its context memory still reads what it "
            "absorbed). Pass generator=PATH to use a trained one."
        )
        gen = Generator.for_base(loaded.model, GeneratorConfig())
    return AdaptedModel(
        loaded,
        gen,
        chunk_tokens=chunk_tokens,
        chunk_batch=chunk_batch,
        memory=memory,
        memory_budget=memory_budget,
        memory_fraction=memory_fraction,
        memory_block=memory_block,
    )
