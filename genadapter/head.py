"""The LM-head adapter: a state that maps "what is being predicted here" to the token that came
next in the absorbed text, read out through the LM head.

For every absorbed position j (context pass, base model alone, chunk by chunk):
    k_j = Wk (norm ⊙ rms(h_j))      h_j: a hidden state of the base at j (the final, normalized
                                     one by default, or the residual input of a decoder layer)
    v_j = Wv e(t_{j+1})             e: the base's input embedding of the token that followed j
    S  += k_j v_j^T                 (r1 x r2), a sum of outer products of base hidden states
At decode, with x the LM head's own input (the final normalized hidden state) and E its weight:
    logits = E (x + alpha B S_hat^T A x),   S_hat = S / sqrt(tokens)
i.e. a low-rank update of the LM head's weight, Delta W = alpha (E B) S_hat^T A: a session still
exports as a LoRA on `lm_head`. Nothing upstream of the head changes, so the hidden states the
adapter reads are the base's own and training it needs no backward pass through the base.

This is linear attention over the document with keys from its positions and values from the
tokens that followed them (an induction-head lookup; cf. the continuous cache of Grave et al.,
ICLR 2017, and kNN-LM, Khandelwal et al., ICLR 2020), folded into the GenerativeAdapter state
form (Chen et al., ICLR 2025)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

HEAD_NAME = "lm_head"
NORMS = ("sqrt", "none")


@dataclass
class HeadConfig:
    r1: int = 256
    r2: int = 256
    alpha: float = 1.0
    key: str = "final"  # "final" (the LM head's input) or "layer:N" (decoder layer N's input)
    norm: str = "sqrt"  # S / sqrt(tokens absorbed), or "none"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"head norm must be one of {NORMS}, not {self.norm!r}")
        if self.key != "final" and not (self.key.startswith("layer:") and self.key[6:].isdigit()):
            raise ValueError(f"head key must be 'final' or 'layer:N', not {self.key!r}")

    @property
    def key_layer(self) -> int | None:
        """Index into a transformers `hidden_states` tuple, or None for the final state."""
        return None if self.key == "final" else int(self.key[6:])

    def to_dict(self) -> dict:
        return asdict(self)


class HeadAdapter(nn.Module):
    """Wk, Wv (document -> state) and A, B (state -> hidden-space delta before the LM head)."""

    def __init__(self, d: int, config: HeadConfig, g: torch.Generator):
        super().__init__()
        self.config = config
        self.alpha = config.alpha
        self.eps = 1e-6
        self.norm = nn.Parameter(torch.ones(d))
        self.Wk = nn.Parameter(torch.randn(config.r1, d, generator=g) / d**0.5)
        self.Wv = nn.Parameter(torch.randn(config.r2, d, generator=g) / d**0.5)
        self.A = nn.Parameter(torch.randn(config.r1, d, generator=g) / d**0.5)
        # Zero B: a fresh head adapter changes nothing.
        self.B = nn.Parameter(torch.zeros(d, config.r2))

    def kv_sums(
        self,
        hidden: torch.Tensor,
        next_embeds: torch.Tensor,
        pair_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per sequence, sum over positions j of k_j v_j^T.

        hidden:      (b, t, d) the key source at positions 0..t-2 of each chunk (any float dtype)
        next_embeds: (b, t, d) input embeddings of the tokens at positions 1..t-1
        pair_mask:   (b, t) 1 where both tokens of the pair are real, else 0; None: all real
        returns      (b, r1, r2) float32"""
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        k = h @ self.Wk.T
        v = next_embeds.float() @ self.Wv.T
        if pair_mask is not None:
            k = k * pair_mask.unsqueeze(-1).to(k.dtype)
        return k.mT @ v

    def normalize(self, S: torch.Tensor, tokens: int) -> torch.Tensor:
        """S_hat: the sum scaled by 1/sqrt(tokens), so one matching position keeps its weight
        against the sqrt(n) growth of the rest. Always finite for a finite S."""
        if self.config.norm == "sqrt" and tokens > 0:
            return S.float() / tokens**0.5
        return S.float()

    def delta(self, x: torch.Tensor, s_hat: torch.Tensor) -> torch.Tensor:
        """alpha B S_hat^T A x in the LM head's input space: x (b, t, d), s_hat (b, r1, r2)."""
        z = (x.float() @ self.A.T) @ s_hat
        return self.alpha * (z @ self.B.T)


def head_pairs(
    model: nn.Module,
    head: HeadAdapter,
    ids: torch.Tensor,
    mask: torch.Tensor,
    final_hidden: torch.Tensor,
    hidden_states: tuple[torch.Tensor, ...] | None,
) -> torch.Tensor:
    """The head adapter's K^T V sums of one batch of right-padded chunks (b, r1, r2): each
    position's key with the embedding of the token after it, within its chunk."""
    layer = head.config.key_layer
    source = final_hidden if layer is None else hidden_states[layer]
    embeds = model.get_input_embeddings()(ids[:, 1:])
    pair_mask = mask[:, :-1] * mask[:, 1:]
    return head.kv_sums(source[:, :-1], embeds, pair_mask)
