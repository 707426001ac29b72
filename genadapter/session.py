"""Session: one user's absorbed context (an AdapterState) and conversation."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from .generation import SamplingParams, generate_ids, stream_text
from .model import AbsorbStats, AdaptedModel
from .state import AdapterState, IncompatibleStateError

STATE_FILE = "state.safetensors"


def _state_path(path: str | os.PathLike) -> Path:
    """A session is saved as DIR/state.safetensors, or to a path ending in .safetensors."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / STATE_FILE


class Session:
    def __init__(self, model: AdaptedModel, state: AdapterState | None = None):
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
    def load(cls, model: AdaptedModel, path: str | os.PathLike) -> Session:
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
        if state.sums.keys() != model.generator.state_shapes().keys():
            raise IncompatibleStateError(f"{path} holds states for other layers")
        session = cls(model, state)
        session.messages = list(meta.get("messages", []))
        session.created = float(meta.get("created", time.time()))
        return session
