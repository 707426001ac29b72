"""Lead 3 of issue 13, measured without training: can a state made from the base's own attention
projections (keys and values of `k_proj`/`v_proj`, queried by `q_proj`, per KV head) carry a
document's facts at all?

Every attention layer of the frozen base is given the document as an extra set of keys and values
that its queries can read, and the answer's NLL (gold answer, teacher-forced, nats per token) is
compared with the document right, with another example's document ("wrong") and with none. The
context part and the local (causal) part of each head's attention are combined exactly as one
softmax over both would be: out = (Z_loc out_loc + Z_ctx out_ctx) / (Z_loc + Z_ctx).

How the context keys are read:

* `exact`:    softmax attention over the document's keys with their rotary positions, the
              target placed after it: prompting with the document right before the chat
              (a check that the machinery reproduces prompting).
* `nopos`:    softmax attention over the document's keys *without* rotary positions (queries too):
              order-free, as a state must be; still a cache of every key, not a fixed-size state.
* `fixed`:    as `nopos`, but every key is seen at one fixed distance D before the query
              (`--distance`, rotary positions 0 for the keys and D for the queries): still
              order-free; tells whether the loss of `nopos` is the missing rotation or the
              missing order.
* `taylor`:   the same order-free attention with exp(q.k/sqrt d) replaced by its second-order
              Taylor expansion 1 + s + s^2/2, which factors through features phi(k) of size
              1 + 64 + 64^2: a fixed-size state S = sum_j phi(k_j) [v_j, 1]^T per KV head, a sum of
              outer products of (features of) the base's hidden states (Based, Arora et al. 2024).
* `linear`:   phi = elu + 1 (Katharopoulos et al. 2020), a 64 x 65 state per KV head.
* `taylor_fixed`, `linear_fixed`: the two kernelized states over the `fixed` geometry (keys rotated
              at position 0, queries at D before the feature map): still order-free and fixed-size.
              `taylor` and `linear` read unrotated keys, the `nopos` geometry, which loses most of
              prompting's gain even with softmax (issue 24, defect 4).

    python training/probes/attention_probe.py --documents 24 \
        --out docs/training/attention-probe.json
    python training/probes/attention_probe.py --modes fixed taylor_fixed linear_fixed \
        --out docs/training/attention-probe-kernel-fixed32.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from genadapter.base import load_base
from genadapter.eval.fictional import qa_examples
from genadapter.eval.prompts import chat_ids

MODES = ("exact", "nopos", "fixed", "taylor", "linear", "taylor_fixed", "linear_fixed")


def features(x: torch.Tensor, mode: str) -> torch.Tensor:
    """phi(x) for the kernelized modes: x (..., d) already scaled by d^-1/4 -> (..., D)."""
    if mode.startswith("linear"):
        return F.elu(x) + 1
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / 2**0.5
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], -1)


class Probe:
    """Replaces every layer's attention forward with one that also reads a document's keys."""

    def __init__(self, model, distance: int = 32):
        self.model = model
        self.distance = distance
        self.layers = model.model.layers
        self.ctx: list[dict] | None = None  # per layer: k_rope, k, v (kv_heads, N, d)
        self.mode = "none"
        self.capture: list[dict] | None = None
        for layer in self.layers:
            layer.self_attn.forward = self._forward(layer.self_attn)

    def _forward(self, attn):
        def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            b, t, _ = hidden_states.shape
            d = attn.head_dim
            q = attn.q_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)
            k = attn.k_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)
            v = attn.v_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)
            cos, sin = position_embeddings
            qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
            if self.capture is not None:
                self.capture.append({"k_rope": kr[0], "k": k[0], "v": v[0]})
            groups = q.shape[1] // k.shape[1]
            rep = lambda x: x.repeat_interleave(groups, dim=1)  # noqa: E731
            scale = attn.scaling
            s = (qr @ rep(kr).transpose(-1, -2)) * scale
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            lse_loc = s.logsumexp(-1, keepdim=True)
            out = torch.softmax(s, -1) @ rep(v)
            self.local = (lse_loc, out)  # the context part's subclasses may read it
            if self.mode != "none":
                c = self.ctx[attn.layer_idx]
                lse_ctx, out_ctx = self._context(attn, q, c, groups, scale, t)
                w = torch.sigmoid(lse_ctx - lse_loc)
                out = (1 - w) * out + w * out_ctx
            out = out.transpose(1, 2).reshape(b, t, -1)
            return attn.o_proj(out), None

        return forward

    def _fixed_distance(self, q, k):
        """Queries q (1, heads, t, d) rotated at position D, keys k (kv, N, d) at position 0:
        every key at one distance before every query. -> (heads, t, d), (kv, N, d)."""
        t, n = q.shape[2], k.shape[1]
        cos, sin = self.model.model.rotary_emb(q, torch.full((1, t), self.distance))
        qr, _ = apply_rotary_pos_emb(q, q, cos, sin)
        cos, sin = self.model.model.rotary_emb(q, torch.zeros(1, n, dtype=torch.long))
        kr, _ = apply_rotary_pos_emb(k[None], k[None], cos, sin)
        return qr[0], kr[0]

    def _context(self, attn, q, c, groups, scale, t):
        rep = lambda x: x.repeat_interleave(groups, dim=0)  # noqa: E731
        n = c["k"].shape[1]
        if self.mode == "exact":
            pos = torch.arange(n, n + t)[None]
            cos, sin = self.model.model.rotary_emb(q, pos)
            qr, _ = apply_rotary_pos_emb(q, q, cos, sin)
            s = qr[0] @ rep(c["k_rope"]).transpose(-1, -2) * scale
        elif self.mode == "fixed":
            qr, kr = self._fixed_distance(q, c["k"])
            s = qr @ rep(kr).transpose(-1, -2) * scale
        elif self.mode == "nopos":
            s = q[0] @ rep(c["k"]).transpose(-1, -2) * scale
        if self.mode in ("exact", "nopos", "fixed"):
            return s.logsumexp(-1, keepdim=True)[None], (torch.softmax(s, -1) @ rep(c["v"]))[None]
        # kernelized: S = sum_j phi(k_j) [v_j, 1]^T, read by phi(q)
        quarter = scale**0.5
        qk, kk = self._fixed_distance(q, c["k"]) if self.mode.endswith("_fixed") else (q[0], c["k"])
        phi_k = features(kk.double() * quarter, self.mode)  # (kv, N, D)
        state = phi_k.transpose(-1, -2) @ torch.cat(
            [c["v"].double(), torch.ones(*c["v"].shape[:2], 1)], -1
        )
        phi_q = features(qk.double() * quarter, self.mode)  # (heads, t, D)
        read = phi_q @ rep(state)  # (heads, t, d + 1)
        z = read[..., -1:].clamp_min(1e-30)
        return z.log().float()[None], (read[..., :-1] / z).float()[None]


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--documents", type=int, default=24)
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--seed", type=int, default=12345, help="not the eval's test or dev seed")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--distance", type=int, default=32, help="the `fixed` mode's distance")
    p.add_argument("--out")
    args = p.parse_args()
    base = load_base(None, device="cpu", dtype=torch.float32)
    model, tok = base.model.eval(), base.tokenizer
    probe = Probe(model, args.distance)
    examples = qa_examples(args.documents, args.questions, args.seed)
    contexts = []
    for ex in examples:
        probe.capture, probe.mode = [], "none"
        model.model(input_ids=torch.tensor([tok.encode(ex.context, add_special_tokens=False)]))
        contexts.append(probe.capture)
    probe.capture = None
    totals: dict[str, list[float]] = {}
    rows, start = [], time.perf_counter()
    for i, ex in enumerate(examples):
        for q in ex.questions:
            prompt = chat_ids(tok, q.text)
            answer = tok.encode(q.answers[0], add_special_tokens=False)
            ids = torch.tensor([prompt + answer])
            row = {"question": q.text, "answer": q.answers[0]}
            runs = [("none", "none", None)]
            for mode in args.modes:
                runs.append((mode, mode, contexts[i]))
                runs.append((f"{mode}_wrong", mode, contexts[(i + 1) % len(examples)]))
            for name, mode, ctx in runs:
                probe.mode, probe.ctx = mode, ctx
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
                nll = F.cross_entropy(logits.float(), torch.tensor(answer)).item()
                row[name] = nll
                totals.setdefault(name, []).append(nll)
            rows.append(row)
        means = {k: round(sum(v) / len(v), 3) for k, v in totals.items()}
        print(f"{i + 1}/{len(examples)} {time.perf_counter() - start:.0f}s {means}", flush=True)
    summary = {k: sum(v) / len(v) for k, v in totals.items()}
    summary.update({f"gap_{m}": summary[f"{m}_wrong"] - summary[m] for m in args.modes})
    summary.update(
        {f"right_better_{m}": sum(r[f"{m}_wrong"] > r[m] for r in rows) for m in args.modes}
    )
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "summary": summary, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    sys.exit(main())
