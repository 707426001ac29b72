"""Session: one user's absorbed context (an AdapterState and a ContextMemory) and conversation.

Imports flow one way: model.py imports this module (AdaptedModel.session() and load_session()
make sessions); this module never imports model.py and uses the model it is given through its
public attributes, as generation.py does."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .generation import SamplingParams, generate_ids, stream_text
from .memory import ContextMemory, MemoryFormatError, fraction_budget, split_template
from .memory_read import SEPARATOR, Layout, MemoryRead, assemble
from .state import AdapterState, CorruptStateError, IncompatibleStateError

STATE_FILE = "state.safetensors"


def _state_path(path: str | os.PathLike) -> Path:
    """A session is saved as DIR/state.safetensors, or to a path ending in .safetensors."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / STATE_FILE


@dataclass
class AbsorbStats:
    """What one absorb call read: tokens, chunks, and the wall time it took."""

    tokens: int
    chunks: int
    seconds: float


class Session:
    """`model` is the AdaptedModel the session belongs to (model.session() makes one).

    A session holds two kinds of absorbed context, both made by the one pass of the base per
    chunk: `state`, the adapter's fixed-size sums (state.py), and `memory`, the chunks' own keys
    and values (memory.py; None when the model keeps no memory). Either may be given (e.g. a
    session that reads a memory without the adapter: Session(model, memory=m))."""

    def __init__(
        self,
        model,
        state: AdapterState | None = None,
        memory: ContextMemory | None | bool = True,
    ):
        self.model = model
        self.state = state if state is not None else model.new_state()
        # True: a new empty memory when the model keeps one; None/False: no memory.
        self.memory = model.new_memory() if memory is True else (memory or None)
        self.messages: list[dict[str, str]] = []  # this session's chat turns
        self.created = time.time()
        # The last memory read: (its memory, the selection, the read), reused.
        self._read: tuple[ContextMemory, tuple, MemoryRead] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the session: the adapter state (fixed by the generator) plus the memory
        (growing with what was absorbed)."""
        return self.state.nbytes + self.memory_bytes

    @property
    def memory_bytes(self) -> int:
        return self.memory.nbytes if self.memory is not None else 0

    @property
    def memory_tokens(self) -> int:
        return self.memory.tokens if self.memory is not None else 0

    @property
    def tokens(self) -> int:
        return self.state.tokens

    def absorb(self, document: object, progress: bool = False) -> AbsorbStats:
        """Absorb one document: text, UTF-8 bytes, or an iterable of pieces of one document.
        Fills the adapter state and, when the session keeps one, the memory, in one pass.

        The session changes only when the whole document was read; bad input raises and leaves
        the session as it was."""
        memory = self.model.new_memory() if self.memory is not None else None
        delta, stats = self.model.encode(document, progress=progress, memory=memory)
        self.state.add_(delta)
        if memory is not None:
            self.memory.extend(memory)
        return stats

    def reset(self) -> None:
        self.state = self.model.new_state()
        if self.memory is not None:
            self.memory.clear()
        self.messages = []

    # -- reading the memory ---------------------------------------------------------------------

    def read(self, query: str | None, header_len: int, budget: int) -> MemoryRead | None:
        """The memory one turn reads (memory.ContextMemory.select over `query`'s lexical
        embedding, at most `budget` tokens, and at most the model's memory_fraction of the
        memory's tokens when set), laid out after a header of `header_len` tokens; None when
        nothing is read. The last layout is kept and reused while the same chunks are read."""
        if not self._reads_memory() or budget <= 0:
            return None
        m = self.model
        q = None
        if query is not None and query.strip():
            from .library.embedding import lexical  # the question's reading by the base alone

            q = lexical(m, [query])
        memory = self._turn_memory(q, budget)
        if memory is None:
            return None
        if m.memory_fraction is not None:  # a share of what it holds, at least one block
            budget = min(budget, fraction_budget(m.memory_fraction, memory.tokens, m.memory_block))
        chunks = memory.select(q, budget, m.memory_threshold, m.memory_keep)
        if not chunks:
            return None
        key = (memory.version, tuple(chunks), header_len)
        if self._read is None or self._read[0] is not memory or self._read[1] != key:
            self._read = (memory, key, assemble(m, memory, chunks, header_len))
        return self._read[2]

    def _reads_memory(self) -> bool:
        """Whether a turn may read a memory at all (else its layout is the plain prompt)."""
        return self.memory is not None and not self.memory.is_empty

    def _turn_memory(self, query, budget: int) -> ContextMemory | None:
        """The memory a turn selects from, for its lexical embedding `query` (None: no text):
        the session's own (a RoutedSession gathers its library entries' memories)."""
        return self.memory

    def text_layout(self, ids: list[int], query: str | None, reserve: int = 0) -> Layout:
        """Raw text `ids` after the memory (what it reads for `query`), itself after the prefix
        its chunks were encoded after; `reserve` tokens of the window are kept free."""
        header = self.model.encoding_prefix
        room = self.model.max_positions - len(header) - len(ids) - reserve
        read = self.read(query, len(header), min(self.model.memory_budget, room))
        return Layout(header, read, ids) if read is not None else Layout([], None, ids)

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | str | None = None,
        seed: int | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Raw continuation of `prompt` (no chat template) under this session's state."""
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        params = SamplingParams(max_new_tokens, temperature, top_p, stop or [], seed)
        ids = self.model.tokenizer.encode(prompt, add_special_tokens=False)
        pieces = self._run(self.text_layout(ids, prompt, max_new_tokens), params)
        return pieces if stream else "".join(pieces)

    def chat(
        self,
        message: str,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | str | None = None,
        seed: int | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Answer `message` with the chat template and this session's earlier turns; the turn is
        recorded once the answer is complete."""
        if not isinstance(message, str) or not message.strip():
            raise ValueError("message must be a non-empty string")
        params = SamplingParams(max_new_tokens, temperature, top_p, stop or [], seed)
        messages = [*self.messages, {"role": "user", "content": message}]
        layout = self.chat_layout(messages, params.max_new_tokens)
        pieces = self._record(messages, self._run(layout, params))
        return pieces if stream else "".join(pieces)

    def chat_layout(self, messages: list[dict], max_new_tokens: int) -> Layout:
        """The templated conversation `messages` (oldest turns dropped while it does not fit the
        window), with what the memory reads for its last message laid out at the start of the
        first user message, then SEPARATOR, as a prompt would put a document there."""
        kept, ids = self._fit_chat(messages, max_new_tokens)
        if not self._reads_memory():
            return Layout([], None, ids)
        header, rest_text = split_template(self.model.tokenizer, kept)
        if rest_text is None:  # no chat template: read as raw text
            return self.text_layout(ids, kept[-1]["content"], max_new_tokens)
        rest = self.model.tokenizer.encode(SEPARATOR + rest_text, add_special_tokens=False)
        room = self.model.max_positions - len(header) - len(rest) - max_new_tokens
        read = self.read(kept[-1]["content"], len(header), min(self.model.memory_budget, room))
        return Layout(header, read, rest) if read is not None else Layout([], None, ids)

    def _run(self, layout: Layout, params: SamplingParams) -> Iterator[str]:
        limit = self.model.max_positions
        if len(layout) + params.max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(layout)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"exceeds the model's window of {limit} tokens"
            )
        tokens = generate_ids(self.model, layout, self.state, params)
        return stream_text(self.model.tokenizer, tokens, params.stop)

    def _record(self, messages: list[dict], pieces: Iterator[str]) -> Iterator[str]:
        answer = []
        for piece in pieces:
            answer.append(piece)
            yield piece
        self.messages = [*messages, {"role": "assistant", "content": "".join(answer)}]

    def _fit_chat(self, messages: list[dict], max_new_tokens: int) -> tuple[list[dict], list[int]]:
        """Template the conversation; drop the oldest turns while it does not fit the window.
        Returns the messages kept and their token ids."""
        tok = self.model.tokenizer
        while True:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok.encode(text, add_special_tokens=False)
            if len(ids) + max_new_tokens <= self.model.max_positions or len(messages) <= 1:
                return messages, ids
            messages = messages[2:]

    # -- export -------------------------------------------------------------------------------

    def to_peft(self, folder: str | os.PathLike, merged: bool = False) -> Path:
        """Write this session's delta as a PEFT LoRA folder (adapter_config.json and
        adapter_model.safetensors, for `peft.PeftModel.from_pretrained` on the plain transformers
        base, or vLLM's LoRA serving); with `merged=True`, a full transformers model folder with
        the delta added to the base's float weights. Returns the folder.

        Raises adapters.export.ExportError for a generator with an LM-head adapter; warns when the
        base runs quantized (the LoRA then applies to its float weights) and when the session's
        memory is not empty (a memory is no LoRA: only the adapter is exported). See
        adapters/export.py."""
        from .adapters.export import export_session

        return export_session(self, folder, merged)

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state, the memory and the conversation atomically to one file (one
        checksum covers them all); returns the file written."""
        target = _state_path(path)
        self.state.save(
            target,
            {
                "base": self.model.base_name,
                "base_fingerprint": self.model.base_fingerprint,
                "generator_fingerprint": self.model.generator_fingerprint,
                "chunk_tokens": self.model.chunk_tokens,
                "messages": self.messages,
                "created": self.created,
                "memory": None
                if self.memory is None
                else {
                    "storage": self.memory.storage,
                    "prefix_len": self.memory.prefix_len,
                    "documents": self.memory.documents,
                },
            },
            extra=self.memory.tensors() if self.memory is not None else None,
        )
        return target

    @classmethod
    def load(cls, model, path: str | os.PathLike) -> Session:
        """The session saved at `path` (DIR or a .safetensors file), on `model`.

        Raises FileNotFoundError, CorruptStateError (damaged or altered file) and
        IncompatibleStateError (made with another base, generator or layers). A file saved before
        sessions kept a memory loads with an empty one."""
        tensors: dict = {}
        state, meta = AdapterState.load(_state_path(path), device=model.device, extra=tensors)
        for key, mine in (
            ("base_fingerprint", model.base_fingerprint),
            ("generator_fingerprint", model.generator_fingerprint),
        ):
            if meta.get(key) != mine:
                what = key.split("_")[0]
                raise IncompatibleStateError(
                    f"{path} was made with another {what} ({meta.get(key)}); "
                    f"this model's {what} is {mine}"
                )
        shapes = {n: tuple(S.shape) for n, S in state.sums.items()}
        if shapes != model.generator.state_shapes():
            raise IncompatibleStateError(f"{path} holds states for other layers")
        messages = meta.get("messages", [])
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages
        ):
            raise CorruptStateError(f"{path}: the stored conversation is malformed")
        session = cls(model, state, memory=cls._load_memory(model, meta, tensors, path))
        session.messages = messages
        session.created = float(meta.get("created", time.time()))
        return session

    @staticmethod
    def _load_memory(model, meta: dict, tensors: dict, path) -> ContextMemory | None | bool:
        info = meta.get("memory")
        if info is None:  # saved without a memory (or before memories existed)
            if tensors:
                raise CorruptStateError(f"{path}: memory tensors without their description")
            return True
        try:
            memory = ContextMemory.from_tensors(
                tensors,
                int(info["prefix_len"]),
                str(info["storage"]),
                int(info["documents"]),
                model.memory_shape,
            )
        except (MemoryFormatError, KeyError, TypeError, ValueError) as e:
            raise CorruptStateError(f"{path}: {e}") from e
        if memory.prefix_len != len(model.encoding_prefix) and not memory.is_empty:
            raise IncompatibleStateError(f"{path}: its memory was encoded after another prefix")
        return memory
