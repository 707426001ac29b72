"""Train the LM-head adapter (genadapter/head.py) by context distillation on cached examples.

The teacher is the base with the document in its prompt; the student is the base with the
document absorbed and only the question in its prompt. The head adapter changes nothing upstream
of the LM head, so the student's hidden states are the base's own no-context states, cached once
by training/probes/distill_cache.py with the teacher's final hidden states (whose LM head gives
its full next-token distribution) and the document's hidden states. A step is then only the adapter:

    loss = KL(teacher || student) at every position of the question tail, the chat template and
           the teacher's answer (answer positions weighted by --answer-weight)

which is the end-to-end objective, exactly (Doc-to-LoRA's context distillation, arXiv 2602.15902),
at a few milliseconds per example. Logs held-out KL, the answer's NLL with the right and with
another document absorbed (their gap is what is read), and the share of answer tokens the
student's argmax gets right; saves a generator folder that `genadapter.load(generator=DIR)` takes.

    python training/probes/train_head.py --train training/cache/mixed \
        --held-out training/cache/evalstyle --save training/runs/head
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

HERE = Path(__file__).resolve().parent  # training/probes: the probes, then the recipe
sys.path[:0] = [str(HERE), str(HERE.parent)]
from distill_cache import KEY_LAYERS  # noqa: E402

from genadapter.base import load_base  # noqa: E402
from genadapter.generator import Generator, GeneratorConfig  # noqa: E402
from genadapter.head import HeadAdapter, HeadConfig, next_token_surprisal  # noqa: E402


def load_rows(folder: str, limit: int | None = None) -> list[dict]:
    rows: list[dict] = []
    for f in sorted(Path(folder).glob("shard-*.pt")):
        rows += torch.load(f)
        if limit and len(rows) >= limit:
            break
    return rows[:limit] if limit else rows


def doc_state(head: HeadAdapter, row: dict, E_in: torch.Tensor, key_layers: tuple) -> torch.Tensor:
    """The head state of one cached document, as the runtime's absorb computes it (r1, r2)."""
    layer = head.config.key_layer
    h = row["doc_final"] if layer is None else row["doc_layers"][key_layers.index(layer)]
    ids = row["doc_ids"].long()
    e = E_in[ids][None]
    S = head.kv_sums(h[None, :-1].float(), e[:, 1:], None, row.get("surprisal"), e[:, :-1])[0]
    return head.normalize(S, len(ids))


def losses(head, E, E_in, row, doc_row, key_layers, answer_weight: float = 1.0, tail: int = 0):
    """(weighted KL to the teacher, answer NLL of the teacher's tokens, argmax agreement);
    tail > 0: only the answer and the `tail` positions before it. head None: the base itself.
    E: the LM head's weight; E_in: the input embeddings the state's values come from."""
    xs, xt, tgt = row["x_student"].float(), row["x_teacher"].float(), row["targets"].long()
    if tail:
        keep = row["answer_len"] + tail
        xs, xt, tgt = xs[-keep:], xt[-keep:], tgt[-keep:]
    if head is not None:
        S = doc_state(head, doc_row, E_in, key_layers)
        xs = xs + head.delta(xs[None], S[None])[0]
    logits = xs @ E.T
    with torch.no_grad():
        t_logp = F.log_softmax(xt @ E.T, -1)
    logp = F.log_softmax(logits, -1)
    kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
    n = row["answer_len"]
    w = torch.ones_like(kl)
    w[-n:] = answer_weight
    nll = -logp[-n:].gather(-1, tgt[-n:, None]).mean()
    agree = (logits[-n:].argmax(-1) == tgt[-n:]).float().mean()
    return (kl * w).sum() / w.sum(), nll, agree


def window(row: dict, n: int, rng: random.Random) -> dict:
    """The row with only a random run of n of its scored positions (a completion row scores
    over a hundred), so one step costs about the same whatever the row; short rows as they are."""
    if row["answer_len"] <= n:
        return row
    stop = len(row["targets"]) - rng.randrange(row["answer_len"] - n + 1)
    cut = {k: row[k][:stop] for k in ("x_student", "x_teacher", "targets")}
    return {**row, **cut, "answer_len": n}


@torch.no_grad()
def add_surprisal(rows: list[dict], E: torch.Tensor) -> None:
    """The base's surprisal of every document token after the first, from the cached final
    states, as the runtime's absorb computes it (head.next_token_surprisal): (1, n-1) per row."""
    for r in rows:
        ids = r["doc_ids"].long()
        r["surprisal"] = next_token_surprisal(r["doc_final"][None, :-1].float(), ids[None, 1:], E)


@torch.no_grad()
def copy_init_(head: HeadAdapter, rows: list[dict], E_in: torch.Tensor, scale: float) -> None:
    """Start as a copy head: query-key match = similarity of the centred final states (their top
    r1 principal directions, whitened), value read-out = identity on the top r2 directions of
    the embeddings, so the untrained head already boosts the tokens that followed positions like
    the current one (an induction head in linear-attention form)."""
    if head.config.key_layer is not None:
        raise ValueError("copy init is for keys from the final state")
    h = torch.cat([r["doc_final"].float() for r in rows])
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + head.eps)
    mu = h.mean(0)
    u = mu / mu.norm()
    centred = h - mu
    _, sig, Vh = torch.linalg.svd(centred, full_matrices=False)
    r1, r2 = head.config.r1, head.config.r2
    P = Vh[:r1] / (sig[:r1, None] / len(h) ** 0.5)  # whitened principal directions
    P = P - (P @ u)[:, None] * u[None]  # drop the shared direction
    _, _, Qh = torch.linalg.svd(E_in - E_in.mean(0), full_matrices=False)
    Q = Qh[:r2]
    with torch.no_grad():
        head.Wk.copy_(P / r1**0.5)
        head.A.copy_(P / r1**0.5)
        head.Wv.copy_(Q)
        head.B.copy_(scale * Q.T)


@torch.no_grad()
def evaluate(head, E, E_in, rows, key_layers, tail: int = 0) -> dict:
    """Held-out means; "_other": the same question with the next example's document absorbed."""
    keys = ("kl", "nll", "agree", "kl_other", "nll_other", "agree_other")
    tot = dict.fromkeys(keys, 0.0)
    for i, row in enumerate(rows):
        right = losses(head, E, E_in, row, row, key_layers, tail=tail)
        wrong = losses(head, E, E_in, row, rows[(i + 1) % len(rows)], key_layers, tail=tail)
        for k, v in zip(keys, (*right, *wrong)):
            tot[k] += float(v)
    out = {k: round(v / len(rows), 4) for k, v in tot.items()}
    out["read_gap"] = round(out["nll_other"] - out["nll"], 4)
    return out


@torch.no_grad()
def reference(E, rows, tail: int = 0) -> dict:
    """The same measures for the base (no delta)."""
    tot = [0.0, 0.0, 0.0]
    for row in rows:
        for i, v in enumerate(losses(None, E, None, row, row, (), tail=tail)):
            tot[i] += float(v)
    return {k: round(v / len(rows), 4) for k, v in zip(("kl", "nll", "agree"), tot)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", nargs="+", default=["training/cache/mixed"], help="cache folders")
    p.add_argument("--held-out", default="training/cache/evalstyle")
    p.add_argument("--limit", type=int, help="use at most this many training rows")
    p.add_argument("--key", default="final", help="final or layer:N (N among the cached layers)")
    p.add_argument("--norm", default="sqrt", choices=["none", "sqrt"])
    p.add_argument("--weight", default="none", choices=["none", "surprisal"])
    p.add_argument("--key-token", action="store_true", help="add the current token to the keys")
    p.add_argument("--window", type=int, default=0, help="values also recall +-N positions")
    p.add_argument("--r1", type=int, default=256)
    p.add_argument("--r2", type=int, default=256)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--answer-weight", type=float, default=4.0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--tail", type=int, default=0, help="score only the answer and N before it")
    p.add_argument(
        "--max-positions", type=int, default=32, help="a random window of a longer row per step"
    )
    p.add_argument("--init", choices=["zero", "copy"], default="zero")
    p.add_argument("--init-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="training/runs/head.jsonl")
    p.add_argument("--save", metavar="DIR", help="write the generator here at every evaluation")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    base = load_base(None, device="cpu", dtype=torch.float32)
    E = base.model.get_output_embeddings().weight.detach()
    E_in = base.model.get_input_embeddings().weight.detach()  # the same matrix when tied
    train = [r for folder in args.train for r in load_rows(folder, args.limit)]
    held = load_rows(args.held_out)
    print(f"{len(train)} training rows, {len(held)} held out; base {reference(E, held, args.tail)}")
    if args.weight == "surprisal":
        add_surprisal(train + held, E)
    head_cfg = HeadConfig(
        args.r1, args.r2, args.alpha, args.key, args.norm, args.weight, args.key_token, args.window
    ).to_dict()
    config = GeneratorConfig(targets=(), head=head_cfg, seed=args.seed)
    generator = Generator.for_base(base.model, config)
    head = generator.head.train()
    if args.init == "copy":
        copy_init_(head, train[:500], E_in, args.init_scale)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    steps = int(args.epochs * len(train) / args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - 0.9 * s / max(steps, 1))
    rng = random.Random(args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    log = open(args.out, "w")
    start = time.perf_counter()
    for step in range(steps + 1):
        if step % args.eval_every == 0 or step == steps:
            row = {"step": step, "seconds": round(time.perf_counter() - start)}
            row.update(evaluate(head, E, E_in, held, KEY_LAYERS, args.tail))
            print(json.dumps(row), flush=True)
            log.write(json.dumps({**row, "args": vars(args)}) + "\n")
            log.flush()
            if args.save:
                generator.config.extra = {
                    "stage": "training/probes/train_head.py (context distillation, cached states)",
                    "args": vars(args),
                    "steps": step,
                    "examples": step * args.batch,
                    "training_rows": len(train),
                    "wall_seconds": row["seconds"],
                    "device": "cpu",
                    "data": "training/DATA.md: distill_sources.py mixed (synth_qa documents, "
                    "generated conversations, general questions with an unrelated document)",
                    "last_eval": row,
                }
                generator.save_pretrained(args.save, base.fingerprint)
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(args.batch):
            r = window(train[rng.randrange(len(train))], args.max_positions, rng)
            kl, _, _ = losses(head, E, E_in, r, r, KEY_LAYERS, args.answer_weight, args.tail)
            total = total + kl / args.batch
        total.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()


if __name__ == "__main__":
    main()
