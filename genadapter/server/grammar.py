"""Structured outputs: OpenAI's `response_format` (`json_object`, `json_schema`) by
grammar-constrained decoding with xgrammar (the library vLLM and SGLang use): before each token
is sampled, the tokens that cannot continue a valid output are masked out.

One GrammarCompiler per server (it caches compiled grammars); one GrammarMatcher per chat, which
the model thread advances token by token (sampling.Row.pick)."""

from __future__ import annotations

import json
import threading

import torch


class GrammarError(ValueError):
    """A response_format whose schema cannot be compiled to a grammar."""


class Grammars:
    """Compiles a chat's response_format into a matcher for the served tokenizer; `vocab_size`
    is the model's logits width (may exceed the tokenizer's)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler = None
        self._lock = threading.Lock()

    def _compiled(self, kind: str, schema: dict | None):
        import xgrammar

        with self._lock:
            if self._compiler is None:
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size
                )
                self._compiler = xgrammar.GrammarCompiler(info)
            if kind == "json_object":  # OpenAI's JSON mode: an object, not any JSON value
                schema = {"type": "object"}
            try:
                # Compact, as OpenAI's: free whitespace lets a small model pad without end.
                return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            except Exception as e:  # xgrammar's own message says what it cannot take
                raise GrammarError(f"response_format.json_schema.schema: {e}") from e

    def matcher(self, response_format: dict | None):
        """A fresh xgrammar.GrammarMatcher for `response_format` ({"type": "json_object"} or
        {"type": "json_schema", "json_schema": {"schema": {...}}}), or None for text / none.
        GrammarError for a schema xgrammar cannot compile."""
        kind = (response_format or {}).get("type", "text")
        if kind == "text":
            return None
        import xgrammar

        schema = (response_format.get("json_schema") or {}).get("schema", {"type": "object"})
        return xgrammar.GrammarMatcher(self._compiled(kind, schema))


def constrain(matcher, logits: torch.Tensor) -> torch.Tensor:
    """`logits` (vocab,) with every token the matcher cannot accept next set to -inf."""
    import xgrammar

    mask = xgrammar.allocate_token_bitmask(1, logits.shape[-1])
    matcher.fill_next_token_bitmask(mask)
    logits = logits.float().clone().unsqueeze(0)
    xgrammar.apply_token_bitmask_inplace(logits, mask.to(logits.device))
    return logits[0]
