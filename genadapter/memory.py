"""The context memory: the base's own keys and values of every absorbed chunk, kept so a session
can read absorbed text as a prompt would (docs/MEMORY.md).

A chunk is encoded by the frozen base *after a fixed prefix* (the chat template's header up to
the user's content, `encoding_prefix`); the prefix's tokens are not kept. What is kept per chunk,
for every layer and KV head, is its keys as the base rotated them at their encoding positions
(prefix_len .. prefix_len + T - 1) and its values. At read time (memory_read.py) the chunks are
laid end to end after the conversation's own header, each rotated by one constant angle to where
it lands; the first chunk under the default header lands where it was encoded, so one absorbed
chunk reads bit for bit as prompting with that text would.

Storage (`storage`): "int8" (default) keeps keys with one float16 scale per channel over the
chunk's tokens and values with one float16 scale per token and head (KIVI's split, arXiv
2402.02750): 0.508 of a bfloat16 KV cache's bytes. "float" keeps the base's own dtype (exact).

Each chunk also keeps a sparse lexical bag (token id -> the largest surprisal the base gave it
in the chunk, library/embedding.py's "lexical" kind) made in the same pass: the search that picks
which chunks a turn reads (select)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

STORAGES = ("int8", "float")
# Default reading policy, chosen on the dev split (docs/MEMORY.md, "Selection").
DEFAULT_BUDGET = 1024  # memory tokens one turn reads at most
DEFAULT_BLOCK = 128  # tokens per selectable block of a chunk
DEFAULT_THRESHOLD = 0.008  # lexical cosine below which a document is not read
DEFAULT_KEEP = 0.75  # documents scoring under KEEP x the best one's score are not read


class MemoryFormatError(ValueError):
    """A memory's tensors are malformed, or do not fit this model."""


def fraction_budget(fraction: float, tokens: int, block: int) -> int:
    """The tokens a turn may read when it reads `fraction` of a memory holding `tokens`: never
    under one `block`, so a small share still reads something (AdaptedModel.memory_fraction)."""
    return max(block, round(fraction * tokens))


def encoding_prefix(tokenizer) -> list[int]:
    """Token ids every chunk is encoded after: the chat template's text up to the first user
    message's content (system prompt and user header), so an absorbed chunk's keys and values are
    those of text inside the user's message, where a prompt puts a document. Tokenizers without
    a chat template get no prefix ([])."""
    before, _ = split_template(tokenizer, [{"role": "user", "content": "x"}], add_generation=False)
    return before


def split_template(tokenizer, messages: list[dict], add_generation: bool = True):
    """(header ids, the rest as text): the chat template of `messages` cut at the start of the
    first user message's content, where the memory is laid out. The header is tokenized on its
    own (the template's special tokens end it, so no token straddles the cut)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return [], None
    first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
    if first is None:
        raise ValueError("a conversation needs a user message")
    mark = "\x00genadapter-memory\x00"
    marked = [dict(m) for m in messages]
    marked[first]["content"] = mark + marked[first]["content"]
    text = tokenizer.apply_chat_template(
        marked, add_generation_prompt=add_generation, tokenize=False
    )
    head, _, rest = text.partition(mark)
    return tokenizer.encode(head, add_special_tokens=False), rest


@dataclass
class MemoryChunk:
    """A block of up to `block` tokens of one absorbed chunk (the unit a turn selects, as
    InfLLM's blocks, arXiv 2402.04617). keys/values: (L, H, T, D), int8 or the base's float
    dtype, keys rotated at the positions they were encoded at, prefix_len + offset + i (offset:
    where the block starts in its chunk). key_scale: (L, H, 1, D) float16, value_scale:
    (L, H, T, 1) float16 (int8 only). lexical_ids (u,) int32 and lexical_weights (u,) float32:
    the block's lexical bag. document: which absorbed document (0-based) it belongs to."""

    keys: torch.Tensor
    values: torch.Tensor
    key_scale: torch.Tensor | None
    value_scale: torch.Tensor | None
    lexical_ids: torch.Tensor
    lexical_weights: torch.Tensor
    document: int = 0
    offset: int = 0

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        parts = (self.keys, self.values, self.key_scale, self.value_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) as (L, H, T, D) in `dtype`."""
        if self.key_scale is None:
            return self.keys.to(dtype), self.values.to(dtype)
        k = self.keys.to(torch.float32) * self.key_scale.float()
        v = self.values.to(torch.float32) * self.value_scale.float()
        return k.to(dtype), v.to(dtype)


def quantize_chunk(keys: torch.Tensor, values: torch.Tensor, storage: str):
    """(keys, values, key_scale, value_scale) for storage: keys/values (L, H, T, D) float."""
    if storage == "float":
        return keys.clone(), values.clone(), None, None
    if storage != "int8":
        raise ValueError(f"memory storage must be one of {STORAGES}, got {storage!r}")
    k_scale = (keys.float().abs().amax(dim=2, keepdim=True) / 127).clamp_min(1e-8).half()
    v_scale = (values.float().abs().amax(dim=3, keepdim=True) / 127).clamp_min(1e-8).half()
    k = (keys.float() / k_scale.float()).round().clamp(-127, 127).to(torch.int8)
    v = (values.float() / v_scale.float()).round().clamp(-127, 127).to(torch.int8)
    return k, v, k_scale, v_scale


def lexical_bag(ids: torch.Tensor, surprisal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse bag of one chunk: unique ids (u,) int32 and each one's largest surprisal (u,)."""
    unique, inverse = torch.unique(ids.cpu(), return_inverse=True)
    weights = torch.zeros(len(unique)).scatter_reduce_(
        0, inverse, surprisal.float().cpu(), "amax", include_self=False
    )
    return unique.to(torch.int32), weights


@dataclass
class ContextMemory:
    """The memory of a session: its absorbed chunks, in absorb order. `prefix_len` is the length
    of the encoding prefix the chunks' key positions count from."""

    prefix_len: int
    storage: str = "int8"
    chunks: list[MemoryChunk] = field(default_factory=list)
    documents: int = 0
    version: int = 0  # bumped on every change: read layouts are cached per version

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    def extend(self, other: ContextMemory) -> None:
        """Append `other`'s chunks (a union: its documents come after this memory's)."""
        if other.prefix_len != self.prefix_len:
            raise MemoryFormatError(
                f"memories encoded after prefixes of {other.prefix_len} and {self.prefix_len} "
                "tokens cannot be joined"
            )
        for c in other.chunks:
            self.chunks.append(
                MemoryChunk(**{**c.__dict__, "document": c.document + self.documents})
            )
        self.documents += other.documents
        self.version += 1

    def clear(self) -> None:
        self.chunks, self.documents = [], 0
        self.version += 1

    # -- selection --------------------------------------------------------------------------

    def relevance(self, query: torch.Tensor, idf: bool = False) -> torch.Tensor:
        """(chunks,) cosine of each block's lexical bag with `query` ((vocab,) of norm 1). With
        `idf`, each token's product is also weighted by its BM25 inverse document frequency over
        this memory's blocks, log((N - df + 0.5) / (df + 0.5) + 1): words every block shares (a
        document's own name) stop deciding which of its blocks answer."""
        if not self.chunks:
            return torch.zeros(0)
        q = query.float().cpu()
        ids = [c.lexical_ids.long() for c in self.chunks]
        weight = [c.lexical_weights * q[i] for c, i in zip(self.chunks, ids, strict=True)]
        if idf:
            n = len(self.chunks)
            df = torch.zeros(len(q)).index_add_(0, torch.cat(ids), torch.ones(sum(map(len, ids))))
            idf_of = ((n - df + 0.5) / (df + 0.5) + 1).log()
            weight = [w * idf_of[i] for w, i in zip(weight, ids, strict=True)]
        norms = [c.lexical_weights.norm().clamp_min(1e-12) for c in self.chunks]
        return torch.stack([w.sum() / n for w, n in zip(weight, norms, strict=True)])

    def select(
        self,
        query: torch.Tensor | None,
        budget: int = DEFAULT_BUDGET,
        threshold: float = DEFAULT_THRESHOLD,
        keep: float = DEFAULT_KEEP,
    ) -> list[int]:
        """Indices of the chunks one turn reads, in absorb order.

        Without a query: the latest chunks within `budget` tokens. With one ((vocab,) lexical
        embedding of the turn): a document's relevance is its best chunk's cosine; documents
        under `threshold`, or under `keep` x the best document's relevance, are not read; of
        the rest, every block when they fit the budget, else the blocks ranked first by their
        IDF-weighted relevance that do."""
        if not self.chunks:
            return []
        if query is None:
            picked, used = [], 0
            for i in reversed(range(len(self.chunks))):
                if used + self.chunks[i].tokens > budget:
                    break
                picked.append(i)
                used += self.chunks[i].tokens
            return sorted(picked)
        score = self.relevance(query)
        docs = torch.tensor([c.document for c in self.chunks])
        best = torch.full((self.documents or int(docs.max()) + 1,), -1.0)
        best = best.scatter_reduce(0, docs, score, "amax")
        top = float(best.max())
        if top < threshold:
            return []
        wanted = best >= max(threshold, keep * top)
        candidates = [i for i in range(len(self.chunks)) if wanted[self.chunks[i].document]]
        if sum(self.chunks[i].tokens for i in candidates) <= budget:
            return candidates
        score = self.relevance(query, idf=True)
        picked, used = [], 0
        for i in sorted(candidates, key=lambda i: -float(score[i])):
            if used + self.chunks[i].tokens <= budget:
                picked.append(i)
                used += self.chunks[i].tokens
        return sorted(picked)

    # -- (de)serialization: tensors under "memory." names, in the session's state file -------

    def tensors(self) -> dict[str, torch.Tensor]:
        """This memory as flat tensors (empty dict when empty): keys/values concatenated over
        chunks along the token axis, per-chunk scales stacked, chunk lengths and documents."""
        if not self.chunks:
            return {}
        cs = self.chunks
        out = {
            "memory.keys": torch.cat([c.keys for c in cs], 2).cpu().contiguous(),
            "memory.values": torch.cat([c.values for c in cs], 2).cpu().contiguous(),
            "memory.chunk_tokens": torch.tensor([c.tokens for c in cs], dtype=torch.int64),
            "memory.chunk_documents": torch.tensor([c.document for c in cs], dtype=torch.int64),
            "memory.chunk_offsets": torch.tensor([c.offset for c in cs], dtype=torch.int64),
            "memory.lexical_counts": torch.tensor([len(c.lexical_ids) for c in cs]),
            "memory.lexical_ids": torch.cat([c.lexical_ids for c in cs]).contiguous(),
            "memory.lexical_weights": torch.cat([c.lexical_weights for c in cs]).contiguous(),
        }
        if cs[0].key_scale is not None:
            out["memory.key_scale"] = torch.cat([c.key_scale for c in cs], 2).cpu().contiguous()
            out["memory.value_scale"] = torch.cat([c.value_scale for c in cs], 2).cpu()
        return out

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        prefix_len: int,
        storage: str,
        documents: int,
        shape: Sequence[int],
    ) -> ContextMemory:
        """The memory `tensors()` wrote; `shape` is this model's (layers, kv heads, head dim).
        Raises MemoryFormatError for tensors that do not fit together or the model."""
        memory = cls(prefix_len, storage)
        if not tensors:
            return memory
        try:
            keys, values = tensors["memory.keys"], tensors["memory.values"]
            lengths = tensors["memory.chunk_tokens"].tolist()
            docs = tensors["memory.chunk_documents"].tolist()
            offsets = tensors["memory.chunk_offsets"].tolist()
            counts = tensors["memory.lexical_counts"].tolist()
            lex_ids = tensors["memory.lexical_ids"].split(counts)
            lex_w = tensors["memory.lexical_weights"].split(counts)
            quantized = "memory.key_scale" in tensors
            if keys.shape != values.shape or keys.dim() != 4:
                raise MemoryFormatError("keys and values differ in shape")
            L, H, D = shape
            if (keys.shape[0], keys.shape[1], keys.shape[3]) != (L, H, D):
                raise MemoryFormatError(f"memory of shape {tuple(keys.shape)} does not fit")
            if sum(lengths) != keys.shape[2] or not len(docs) == len(lengths) == len(counts):
                raise MemoryFormatError("chunk lengths do not add up")
            if quantized != (keys.dtype == torch.int8) or (storage == "int8") != quantized:
                raise MemoryFormatError(f"memory dtype {keys.dtype} is not {storage} storage")
            k_chunks, v_chunks = keys.split(lengths, 2), values.split(lengths, 2)
            ks = tensors["memory.key_scale"].split(1, 2) if quantized else [None] * len(lengths)
            vs = tensors["memory.value_scale"].split(lengths, 2) if quantized else ks
            for i in range(len(lengths)):
                if not 0 <= docs[i] < max(documents, 1) or offsets[i] < 0:
                    raise MemoryFormatError("a chunk names a document the memory lacks")
                memory.chunks.append(
                    MemoryChunk(
                        k_chunks[i],
                        v_chunks[i],
                        ks[i],
                        vs[i],
                        lex_ids[i],
                        lex_w[i],
                        docs[i],
                        offsets[i],
                    )
                )
        except (KeyError, RuntimeError, TypeError, IndexError) as e:
            raise MemoryFormatError(f"malformed memory tensors ({e})") from e
        memory.documents = documents
        return memory
