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
WEIGHTS = ("none", "surprisal")


@dataclass
class HeadConfig:
    r1: int = 256
    r2: int = 256
    alpha: float = 1.0
    key: str = "final"  # "final" (the LM head's input) or "layer:N" (decoder layer N's input)
    norm: str = "sqrt"  # S / sqrt(tokens absorbed), or "none"
    # Each pair's weight: "none" (1), or "surprisal": sigmoid(gain (s_j - shift)) in (0, 1), s_j
    # the base's own surprisal of token j+1 (nats), gain and shift learned: what the base already
    # predicts is worth little to store, a new name or number is worth much.
    weight: str = "none"
    # Add the current token's own embedding to each key (k_j += Wt e(t_j)), so a lookup can tell
    # "inside a name, after its first piece" from "after its last piece" (an induction head's
    # previous-token match; Olsson et al. 2022). Wt starts at zero.
    key_token: bool = False
    # Add to each value the (surprisal-weighted) embeddings of the next tokens of the `window`
    # positions on either side (v_j += Wu sum_{|i-j|<=m} w_i e(t_{i+1}) / (2m+1)), so a key also
    # recalls what stood near it, not only what came next: "X started the business" can then
    # answer "who founded X?", whose answer comes before the words that match. 0: off.
    window: int = 0

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"head norm must be one of {NORMS}, not {self.norm!r}")
        if self.weight not in WEIGHTS:
            raise ValueError(f"head weight must be one of {WEIGHTS}, not {self.weight!r}")
        if self.window < 0:
            raise ValueError(f"head window must be >= 0, not {self.window}")
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
        if config.weight == "surprisal":
            self.w_gain = nn.Parameter(torch.tensor(1.0))
            self.w_shift = nn.Parameter(torch.tensor(2.0))
        if config.key_token:
            self.Wt = nn.Parameter(torch.zeros(config.r1, d))
        if config.window:
            self.Wu = nn.Parameter(torch.zeros(config.r2, d))

    def pair_weights(self, surprisal: torch.Tensor) -> torch.Tensor:
        """Each pair's weight from the base's surprisal of its value token (nats, any shape)."""
        return torch.sigmoid(self.w_gain * (surprisal.float() - self.w_shift))

    def kv_sums(
        self,
        hidden: torch.Tensor,
        next_embeds: torch.Tensor,
        pair_mask: torch.Tensor | None,
        surprisal: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per sequence, sum over positions j of w_j k_j v_j^T.

        hidden:      (b, t, d) the key source at positions 0..t-2 of each chunk (any float dtype)
        next_embeds: (b, t, d) input embeddings of the tokens at positions 1..t-1
        pair_mask:   (b, t) 1 where both tokens of the pair are real, else 0; None: all real
        surprisal:   (b, t) the base's -log p of each next token; needed when config.weight is
                     "surprisal" (ValueError without it), ignored otherwise
        embeds:      (b, t, d) input embeddings of the tokens at positions 0..t-2; needed when
                     config.key_token (ValueError without it), ignored otherwise
        returns      (b, r1, r2) float32, also under a bfloat16 autocast"""
        with torch.autocast(hidden.device.type, enabled=False):  # float32 also in training
            return self._kv_sums(hidden, next_embeds, pair_mask, surprisal, embeds)

    def _kv_sums(self, hidden, next_embeds, pair_mask, surprisal, embeds) -> torch.Tensor:
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        k = h @ self.Wk.T
        if self.config.key_token:
            if embeds is None:
                raise ValueError("a head with token keys needs the current tokens' embeddings")
            k = k + embeds.float() @ self.Wt.T
        v = next_embeds.float() @ self.Wv.T
        w = torch.ones(k.shape[:-1], dtype=k.dtype, device=k.device)
        if self.config.weight == "surprisal":
            if surprisal is None:
                raise ValueError("a surprisal-weighted head needs the next tokens' surprisal")
            w = self.pair_weights(surprisal)
        if pair_mask is not None:
            w = w * pair_mask.to(w.dtype)
        if self.config.window:
            m = self.config.window
            near = window_sums(next_embeds.float() * w.unsqueeze(-1), m) / (2 * m + 1)
            v = v + near @ self.Wu.T
        return (k * w.unsqueeze(-1)).mT @ v

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
    embeds = model.get_input_embeddings()(ids)
    pair_mask = mask[:, :-1] * mask[:, 1:]
    surprisal = None
    if head.config.weight == "surprisal":
        lm_weight = model.get_output_embeddings().weight
        surprisal = next_token_surprisal(final_hidden[:, :-1], ids[:, 1:], lm_weight)
    return head.kv_sums(source[:, :-1], embeds[:, 1:], pair_mask, surprisal, embeds[:, :-1])


def window_sums(x: torch.Tensor, m: int) -> torch.Tensor:
    """out[:, j] = sum of x[:, i] over |i - j| <= m within the sequence: x (b, t, d)."""
    c = torch.nn.functional.pad(x.cumsum(1), (0, 0, 1, 0))  # c[:, i] = sum of x[:, :i]
    t = x.shape[1]
    hi = torch.clamp(torch.arange(t, device=x.device) + m + 1, max=t)
    lo = torch.clamp(torch.arange(t, device=x.device) - m, min=0)
    return c[:, hi] - c[:, lo]


@torch.no_grad()
def next_token_surprisal(
    final_hidden: torch.Tensor, next_ids: torch.Tensor, lm_weight: torch.Tensor, block: int = 128
) -> torch.Tensor:
    """-log p(next token) under the base's own LM head, in blocks of positions so the full
    vocabulary's logits are never held for a whole chunk at once.

    final_hidden: (b, t, d) the LM head's input; next_ids: (b, t) long; lm_weight: (V, d)
    returns (b, t) float32 nats"""
    out = torch.empty(next_ids.shape, dtype=torch.float32, device=next_ids.device)
    for i in range(0, next_ids.shape[1], block):
        logits = (final_hidden[:, i : i + block] @ lm_weight.T).float()
        picked = logits.gather(-1, next_ids[:, i : i + block, None])[..., 0]
        out[:, i : i + block] = logits.logsumexp(-1) - picked
    return out
