"""One chat's row of the batch and how it picks its tokens: its random generator, OpenAI's logit
adjustments (logit_bias, presence and frequency penalties), and the library's sampler.

Everything here is computed per row, so a failure (a seed torch refuses, logits a temperature
turns into NaN) belongs to one chat and the worker fails that chat alone."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

import torch

from ..generation import SamplingParams, sample
from ..memory_read import Layout
from ..state import AdapterState
from .grammar import constrain


@dataclass
class LogitAdjust:
    """OpenAI's logit adjustments, applied before sampling (greedy included): each token's logit
    gets `logit_bias[token]`, minus `frequency_penalty` times the number of times the answer has
    produced it so far, minus `presence_penalty` once it has produced it at all."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class Finished:
    """The last item of a chat's token queue: "stop" (end of sequence), "length" (max tokens),
    "cancelled", or "error" with a message."""

    reason: str
    error: str | None = None


@dataclass
class ChatJob:
    """A chat as the worker gets it; its tokens (ints, then one Finished) arrive on `tokens`.
    `prompt`: token ids, or a Layout reading the session's memory (its len counts the memory)."""

    prompt: list[int] | Layout
    state: AdapterState | None
    params: SamplingParams
    adjust: LogitAdjust | None = None
    # Layer name -> Routes: a chat routed over a library (routed.py) instead of one state.
    routes: dict | None = None
    # An xgrammar GrammarMatcher: the answer must follow the request's response_format.
    grammar: object | None = None
    tokens: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False  # set by the reader (client gone, stop string seen)

    def cancel(self) -> None:
        """Ask the worker to stop this chat; it ends with Finished("cancelled")."""
        self.cancelled = True

    def fail(self, e: BaseException) -> None:
        """End this chat with an error (the worker calls this; nothing else of the batch ends)."""
        self.tokens.put(Finished("error", f"{type(e).__name__}: {e}"))


@dataclass
class Row:
    """A running chat: one row of the batch."""

    job: ChatJob
    rng: torch.Generator | None
    length: int  # real tokens in the KV cache
    produced: int = 0
    next_token: int = 0
    bias: torch.Tensor | None = None  # logit_bias over the vocabulary
    counts: torch.Tensor | None = None  # times each token was produced (penalties only)

    @classmethod
    def start(cls, job: ChatJob, vocab_size: int, device) -> Row:
        """The row of a chat about to be prefilled; raises if its settings cannot be made."""
        row = cls(job, new_rng(job.params, device), len(job.prompt))
        adjust = job.adjust
        if adjust is not None and adjust.logit_bias:
            row.bias = torch.zeros(vocab_size, device=device)
            ids = torch.tensor(list(adjust.logit_bias), dtype=torch.long, device=device)
            row.bias[ids] = torch.tensor(list(adjust.logit_bias.values()), device=device)
        if adjust is not None and adjust.penalized:
            row.counts = torch.zeros(vocab_size, device=device)
        return row

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits (adjusted, constrained to its grammar, then
        sampled)."""
        if self.bias is not None or self.counts is not None:
            logits = logits.float()
            if self.bias is not None:
                logits = logits + self.bias[: logits.shape[-1]]
            if self.counts is not None:
                counts = self.counts[: logits.shape[-1]]
                logits = logits - self.job.adjust.frequency_penalty * counts
                logits = logits - self.job.adjust.presence_penalty * (counts > 0).float()
        if self.job.grammar is not None:
            logits = constrain(self.job.grammar, logits)
        token = sample(logits, self.job.params, self.rng)
        if self.job.grammar is not None:
            self.job.grammar.accept_token(token)
        if self.counts is not None:
            self.counts[token] += 1
        return token


def new_rng(params: SamplingParams, device) -> torch.Generator | None:
    """The generator of a sampled (not greedy) chat, seeded by `params.seed` when given."""
    if params.temperature == 0:
        return None
    rng = torch.Generator(device=device)
    rng.manual_seed(params.seed if params.seed is not None else torch.seed())
    return rng
