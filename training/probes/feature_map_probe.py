"""Lead 3 of issue 13, second probe: a fixed-size, order-free state per attention head, with a
feature map trained layer-locally to imitate the base's own softmax attention over a document.

`attention_probe.py` measured that the base reads a document as well as with it in the prompt
when every document key is seen at one fixed rotary distance D before the query (`fixed` mode:
order-free), but that the fixed-size kernel states tried there (second-order Taylor, elu + 1)
read nothing. Here each query head i of each layer gets positive random features
(Choromanski et al. 2021, "Performer") made learnable (as Hedgehog / LoLCATs learn theirs,
Zhang et al. 2024, arXiv 2402.04347 and 2410.10254):

    phi_i(x) = exp(W_i x - |x|^2 / 2) / sqrt(m),   x = rotated query or key * d^-1/4,
    W_i (m x d) initialised N(0, 1): then E[phi(q) . phi(k)] = exp(q.k / sqrt d) exactly.

The state of a document is, per head, S_i = sum_j phi_i(k_j) [v_j, 1]^T (m x (d + 1)): a sum of
outer products of features of the base's keys and values. It is read like attention: out_ctx =
phi(q)^T S[:, :d] / Z, Z = phi(q)^T S[:, d], and combined with the local attention exactly as one
softmax over both would be (weight Z / (Z + Z_loc)). Training is layer-local and needs no backward
pass through the base: from one `fixed`-mode pass (the base reading the document exactly), each
layer's combined output is the target, MSE normalised so that ignoring the document scores 1.

Training documents: training/synth_qa.py (generated; training/DATA.md). Held out: the same 24
evaluation-style documents as attention_probe.py (seed 12345, neither the test nor the dev seed).

    python training/probes/feature_map_probe.py --steps 600 \
        --out docs/training/feature-map-probe.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

HERE = Path(__file__).resolve().parent  # training/probes: the probes, then the recipe
sys.path[:0] = [str(HERE), str(HERE.parent)]
import synth_qa  # noqa: E402
from attention_probe import Probe  # noqa: E402

from genadapter.base import load_base  # noqa: E402
from genadapter.eval.fictional import qa_examples  # noqa: E402
from genadapter.eval.prompts import chat_ids  # noqa: E402


class FeatureProbe(Probe):
    """Probe with two more modes: `record` (the exact fixed-distance read, keeping what each
    layer's loss needs) and `feature` (the learned fixed-size state instead)."""

    def __init__(self, model, distance: int, features: int):
        super().__init__(model, distance)
        cfg = model.config
        heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.W = torch.nn.Parameter(torch.randn(len(self.layers), heads, features, d))
        self.bias = torch.nn.Parameter(torch.zeros(len(self.layers), heads, 1, 1))
        self.records: list[dict] = []

    def rotated_query(self, q, t):
        cos, sin = self.model.model.rotary_emb(q, torch.full((1, t), self.distance))
        return apply_rotary_pos_emb(q, q, cos, sin)[0][0]

    def _context(self, attn, q, c, groups, scale, t):
        if self.mode not in ("record", "feature"):
            return super()._context(attn, q, c, groups, scale, t)
        qr = self.rotated_query(q, t)  # (heads, t, d); keys stay at rotary position 0
        k = c["k"].repeat_interleave(groups, dim=0)
        v = c["v"].repeat_interleave(groups, dim=0)
        if self.mode == "record":
            lse_loc, out_loc = self.local
            self.records.append(
                {"q": qr, "k": k, "v": v, "lse_loc": lse_loc[0], "out_loc": out_loc[0]}
            )
            s = qr @ k.transpose(-1, -2) * scale
            return s.logsumexp(-1, keepdim=True)[None], (torch.softmax(s, -1) @ v)[None]
        lse, out = self.read(attn.layer_idx, qr, k, v, scale)
        return lse[None], out[None]

    def read(self, layer: int, q, k, v, scale):
        """The learned state's read: q (h, t, d), k and v (h, N, d) -> (log Z (h, t, 1), out)."""
        W, m = self.W[layer], self.W.shape[2]
        xq, xk = q * scale**0.5, k * scale**0.5
        lk = xk @ W.transpose(-1, -2) - xk.pow(2).sum(-1, keepdim=True) / 2  # (h, N, m)
        top = lk.amax(1, keepdim=True)  # (h, 1, m): a per-feature scale, for float range only
        ek = torch.exp(lk - top)
        sv, sz = (
            ek.transpose(-1, -2) @ v,
            ek.sum(1).unsqueeze(-1),
        )
        lq = xq @ W.transpose(-1, -2) - xq.pow(2).sum(-1, keepdim=True) / 2 + top
        g = lq.amax(-1, keepdim=True)
        eq = torch.exp(lq - g)
        den = eq @ sz
        lse = g + den.log() - math.log(m) + self.bias[layer]
        return lse, (eq @ sv) / den


def layer_loss(probe: FeatureProbe, layer: int, r: dict, scale: float) -> torch.Tensor:
    """|combined(learned) - combined(exact)|^2 / |combined(exact) - local|^2 for one layer."""
    s = r["q"] @ r["k"].transpose(-1, -2) * scale
    w = torch.sigmoid(s.logsumexp(-1, keepdim=True) - r["lse_loc"])
    target = (1 - w) * r["out_loc"] + w * (torch.softmax(s, -1) @ r["v"])
    lse, out = probe.read(layer, r["q"], r["k"], r["v"], scale)
    w_hat = torch.sigmoid(lse - r["lse_loc"])
    pred = (1 - w_hat) * r["out_loc"] + w_hat * out
    return (pred - target).pow(2).sum() / (target - r["out_loc"]).pow(2).sum().clamp_min(1e-9)


def capture_doc(probe, model, tok, text: str) -> list[dict]:
    probe.capture, probe.mode = [], "none"
    with torch.no_grad():
        model.model(input_ids=torch.tensor([tok.encode(text, add_special_tokens=False)]))
    out, probe.capture = probe.capture, None
    return out


@torch.no_grad()
def evaluate(probe, model, tok, examples, contexts) -> dict:
    sums = {"none": 0.0, "fixed": 0.0, "feature": 0.0, "feature_wrong": 0.0}
    right_better, n = 0, 0
    for i, ex in enumerate(examples):
        for q in ex.questions:
            prompt = chat_ids(tok, q.text)
            answer = tok.encode(q.answers[0], add_special_tokens=False)
            ids = torch.tensor([prompt + answer])
            row = {}
            for name, mode, ctx in [
                ("none", "none", None),
                ("fixed", "fixed", contexts[i]),
                ("feature", "feature", contexts[i]),
                ("feature_wrong", "feature", contexts[(i + 1) % len(contexts)]),
            ]:
                probe.mode, probe.ctx = mode, ctx
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
                row[name] = F.cross_entropy(logits.float(), torch.tensor(answer)).item()
                sums[name] += row[name]
            right_better += row["feature_wrong"] > row["feature"]
            n += 1
    out = {k: v / n for k, v in sums.items()}
    out["gap"] = out["feature_wrong"] - out["feature"]
    out["right_better"] = right_better
    out["questions"] = n
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--distance", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--documents", type=int, default=24, help="held-out documents (2 questions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    base = load_base(None, device="cpu", dtype=torch.float32)
    model, tok = base.model.eval(), base.tokenizer
    for prm in model.parameters():
        prm.requires_grad_(False)
    probe = FeatureProbe(model, args.distance, args.features)
    scale = model.model.layers[0].self_attn.scaling
    held = qa_examples(args.documents, 2, 12345)
    held_ctx = [capture_doc(probe, model, tok, ex.context) for ex in held]
    opt = torch.optim.Adam([probe.W, probe.bias], lr=args.lr)
    rng = random.Random(args.seed)
    log, start, recent = [], time.perf_counter(), []

    def checkpoint(step: int) -> None:
        probe.records = []
        row = {"step": step, "seconds": round(time.perf_counter() - start), "train_loss": None}
        if recent:
            row["train_loss"] = sum(recent) / len(recent)
        row.update(evaluate(probe, model, tok, held, held_ctx))
        log.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "log": log}, indent=1))

    checkpoint(0)
    for step in range(1, args.steps + 1):
        ex = synth_qa.make_example(rng, distractors=rng.randint(0, 2))
        ctx = capture_doc(probe, model, tok, ex.document)
        ids = chat_ids(tok, ex.question) + tok.encode(ex.answer, add_special_tokens=False)
        probe.mode, probe.ctx, probe.records = "record", ctx, []
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        loss = sum(layer_loss(probe, i, r, scale) for i, r in enumerate(probe.records))
        loss = loss / len(probe.records)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if step % args.eval_every == 0 or step == args.steps:
            checkpoint(step)


if __name__ == "__main__":
    main()
