"""Session: one user's absorbed context (an AdapterState) and conversation.

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
    """`model` is the AdaptedModel the session belongs to (model.session() makes one)."""

    def __init__(self, model, state: AdapterState | None = None):
        self.model = model
        self.state = state if state is not None else model.new_state()
        self.messages: list[dict[str, str]] = []  # this session's chat turns
        self.created = time.time()

    @property
    def nbytes(self) -> int:
        """Bytes of the session's state: fixed by the generator, whatever was absorbed."""
        return self.state.nbytes

    @property
    def tokens(self) -> int:
        return self.state.tokens

    def absorb(self, document: object, progress: bool = False) -> AbsorbStats:
        """Absorb one document: text, UTF-8 bytes, or an iterable of pieces of one document.

        The state changes only when the whole document was read; bad input raises and leaves the
        session as it was."""
        delta, stats = self.model.encode(document, progress=progress)
        self.state.add_(delta)
        return stats

    def reset(self) -> None:
        self.state = self.model.new_state()
        self.messages = []

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
        pieces = self._run(ids, params)
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
        ids = self._fit_chat(messages, params.max_new_tokens)
        pieces = self._record(messages, self._run(ids, params))
        return pieces if stream else "".join(pieces)

    def _run(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        limit = self.model.max_positions
        if len(ids) + params.max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's window of {limit} tokens"
            )
        tokens = generate_ids(self.model, ids, self.state, params)
        return stream_text(self.model.tokenizer, tokens, params.stop)

    def _record(self, messages: list[dict], pieces: Iterator[str]) -> Iterator[str]:
        answer = []
        for piece in pieces:
            answer.append(piece)
            yield piece
        self.messages = [*messages, {"role": "assistant", "content": "".join(answer)}]

    def _fit_chat(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        """Template the conversation; drop the oldest turns while it does not fit the window."""
        tok = self.model.tokenizer
        while True:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok.encode(text, add_special_tokens=False)
            if len(ids) + max_new_tokens <= self.model.max_positions or len(messages) <= 1:
                return ids
            messages = messages[2:]

    # -- export -------------------------------------------------------------------------------

    def to_peft(self, folder: str | os.PathLike, merged: bool = False) -> Path:
        """Write this session's delta as a PEFT LoRA folder (adapter_config.json and
        adapter_model.safetensors, for `peft.PeftModel.from_pretrained` on the plain transformers
        base, or vLLM's LoRA serving); with `merged=True`, a full transformers model folder with
        the delta added to the base's float weights. Returns the folder.

        Raises export.ExportError for a generator with an LM-head adapter; warns when the base
        runs quantized (the LoRA then applies to its float weights). See genadapter/export.py."""
        from .export import session_lora, write_merged

        lora = session_lora(self.model, self.state)
        return write_merged(self.model, lora, folder) if merged else lora.save(folder)

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state and conversation atomically; returns the file written."""
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
            },
        )
        return target

    @classmethod
    def load(cls, model, path: str | os.PathLike) -> Session:
        """The session saved at `path` (DIR or a .safetensors file), on `model`.

        Raises FileNotFoundError, CorruptStateError (damaged or altered file) and
        IncompatibleStateError (made with another base, generator or layers)."""
        state, meta = AdapterState.load(_state_path(path), device=model.device)
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
        session = cls(model, state)
        session.messages = messages
        session.created = float(meta.get("created", time.time()))
        return session
