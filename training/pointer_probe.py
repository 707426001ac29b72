"""Probe: an LM-head adapter whose state pairs each document position's key with the *next*
token's embedding, trained by distilling the prompted teacher on cached hidden states.

    S = sum_j k_j v_{j+1}^T,  k_j = Wk rms(h_j),  v_{j+1} = Wv e(t_{j+1})
    logits_i = E (x_i + alpha B S_hat^T A x_i)          (E: the tied embedding / LM head)

so the delta is a low-rank update of the LM head (B_lora = E B, A_lora = S_hat^T A) and the
hidden states upstream of it are the base's own: the cached no-context states are exactly what
the adapted model sees, and the loss is the end-to-end KL to the teacher.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_cache import KEY_LAYERS  # noqa: E402

from genadapter.base import load_base  # noqa: E402


def load_rows(folder: str, limit: int | None = None) -> list[dict]:
    rows = []
    for f in sorted(Path(folder).glob("shard-*.pt")):
        rows += torch.load(f)
        if limit and len(rows) >= limit:
            break
    return rows[:limit] if limit else rows


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Pointer(nn.Module):
    def __init__(self, d: int, r1: int, r2: int, key: str, norm: str, alpha: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.key, self.norm, self.alpha = key, norm, alpha
        self.key_norm = nn.Parameter(torch.ones(d))
        self.Wk = nn.Parameter(torch.randn(r1, d, generator=g) / d**0.5)
        self.A = nn.Parameter(torch.randn(r1, d, generator=g) / d**0.5)
        self.Wv = nn.Parameter(torch.randn(r2, d, generator=g) / d**0.5)
        self.B = nn.Parameter(torch.zeros(d, r2))

    def keys_source(self, row: dict) -> torch.Tensor:
        if self.key == "final":
            return row["doc_final"].float()
        return row["doc_layers"][KEY_LAYERS.index(int(self.key))].float()

    def state(self, row: dict, E: torch.Tensor) -> torch.Tensor:
        h = rms(self.keys_source(row)) * self.key_norm
        ids = row["doc_ids"].long()
        k = h[:-1] @ self.Wk.T
        v = E[ids[1:]] @ self.Wv.T
        S = k.T @ v
        if self.norm == "sqrt":
            S = S / max(len(ids) - 1, 1) ** 0.5
        elif self.norm == "mean":
            S = S / max(len(ids) - 1, 1)
        return S

    def hidden(self, x: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * ((x @ self.A.T) @ S) @ self.B.T


def example_losses(model: Pointer, E, row, other=None, answer_weight: float = 1.0):
    """KL(teacher || student) per position, answer NLL of the teacher's tokens, argmax agreement."""
    xs, xt = row["x_student"].float(), row["x_teacher"].float()
    tgt = row["targets"].long()
    S = model.state(other if other is not None else row, E)
    logits = model.hidden(xs, S) @ E.T
    with torch.no_grad():
        t_logp = F.log_softmax(xt @ E.T, -1)
    logp = F.log_softmax(logits, -1)
    kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
    n_ans = row["answer_len"]
    w = torch.ones_like(kl)
    w[-n_ans:] = answer_weight
    nll = -logp[-n_ans:].gather(-1, tgt[-n_ans:, None]).squeeze(-1)
    agree = (logits[-n_ans:].argmax(-1) == tgt[-n_ans:]).float()
    return (kl * w).sum() / w.sum(), nll.mean(), agree.mean()


@torch.no_grad()
def evaluate(model: Pointer, E, rows: list[dict]) -> dict:
    tot = {"kl": 0.0, "nll": 0.0, "agree": 0.0, "kl_other": 0.0, "nll_other": 0.0, "agree_other": 0}
    for i, row in enumerate(rows):
        kl, nll, ag = example_losses(model, E, row)
        klo, nllo, ago = example_losses(model, E, row, other=rows[(i + 1) % len(rows)])
        for k, v in zip(tot, (kl, nll, ag, klo, nllo, ago)):
            tot[k] += float(v)
    out = {k: round(v / len(rows), 4) for k, v in tot.items()}
    out["read_gap"] = round(out["nll_other"] - out["nll"], 4)
    return out


@torch.no_grad()
def reference(E, rows: list[dict]) -> dict:
    """The same measures with no delta (the base) and for the teacher itself."""
    kl = nll = ag = 0.0
    for row in rows:
        xs, xt, tgt = row["x_student"].float(), row["x_teacher"].float(), row["targets"].long()
        n = row["answer_len"]
        t_logp, logp = F.log_softmax(xt @ E.T, -1), F.log_softmax(xs @ E.T, -1)
        kl += float((t_logp.exp() * (t_logp - logp)).sum(-1).mean())
        nll += float(-logp[-n:].gather(-1, tgt[-n:, None]).mean())
        ag += float(((xs[-n:] @ E.T).argmax(-1) == tgt[-n:]).float().mean())
    return {"kl": kl / len(rows), "nll": nll / len(rows), "agree": ag / len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train", default="training/cache/synth")
    p.add_argument("--held-out", default="training/cache/evalstyle")
    p.add_argument("--limit", type=int)
    p.add_argument("--key", default="final", help="final or one of the cached layers")
    p.add_argument("--norm", default="sqrt", choices=["none", "sqrt", "mean"])
    p.add_argument("--r1", type=int, default=256)
    p.add_argument("--r2", type=int, default=256)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--answer-weight", type=float, default=4.0)
    p.add_argument("--contrast", type=float, default=0.0, help="weight of -KL under another doc")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", default="training/runs/pointer.jsonl")
    p.add_argument("--save")
    args = p.parse_args()
    torch.manual_seed(0)
    E = load_base(None, device="cpu", dtype=torch.float32).model.lm_head.weight.detach()
    train, held = load_rows(args.train, args.limit), load_rows(args.held_out)
    print(f"{len(train)} training rows, {len(held)} held out; base {reference(E, held)}")
    model = Pointer(E.shape[1], args.r1, args.r2, args.key, args.norm, args.alpha, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    steps = int(args.epochs * len(train) / args.batch)
    rng = random.Random(0)
    log = open(args.out, "w")
    start = time.perf_counter()
    for step in range(steps + 1):
        if step % args.eval_every == 0 or step == steps:
            row = {
                "step": step,
                "s": round(time.perf_counter() - start),
                **evaluate(model, E, held),
            }
            print(json.dumps(row), flush=True)
            log.write(json.dumps({**row, "args": vars(args)}) + "\n")
            log.flush()
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(args.batch):
            row = train[rng.randrange(len(train))]
            kl, _, _ = example_losses(model, E, row, answer_weight=args.answer_weight)
            loss = kl
            total = total + loss / args.batch
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    if args.save:
        torch.save({"args": vars(args), "state": model.state_dict()}, args.save)


if __name__ == "__main__":
    main()
