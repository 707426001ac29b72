"""Train the adapter generator on a frozen base: self-supervised pretraining (completion and
reconstruction, as in the paper) and instruction tuning (answer a question about absorbed text).

    python training/train.py --config training/configs/pretrain.json [--steps 500 ...]
    torchrun --nproc_per_node=2 training/train.py --config ...        (DDP; gloo on CPU)

Each step draws, per sequence, a task and a document segment:
  completion      absorb n_ctx tokens, score the next target_tokens with the adapter
  reconstruction  absorb n_ctx tokens, score a target_tokens span taken from inside them
  qa              absorb a synthetic document, score the answer to a chat question about it
  complement, complement_chat
                  stage 2: the adapter beside the context memory read at a small budget,
                  distilled from the document in the prompt (complement.py)
The context pass runs through the frozen base without building its graph (only Wk, Wv and the
norm see gradients there); the target pass backpropagates through the base into A, B and S_hat.
All randomness of a step is a function of (seed, rank, step), so a resumed run is exact.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from complement import (  # noqa: E402
    COMPLEMENT_TASKS,
    batch_loss,
    draw_complement,
    evaluate_complement,
)
from dev_eval import evaluate, evaluate_qa, plot_curves  # noqa: E402
from passes import Corpus, Sample  # noqa: E402
from synth_qa import make_example  # noqa: E402

from genadapter.base import load_base  # noqa: E402
from genadapter.generator import Generator, GeneratorConfig  # noqa: E402
from genadapter.model import AdaptedModel  # noqa: E402

log = logging.getLogger("train")


@dataclass
class TrainConfig:
    out_dir: str = "training/runs/pretrain"
    data_dir: str = "training/data"
    base: str | None = None  # None: the embedded default model
    init_from: str | None = None  # a generator folder to continue from
    r1: int = 32
    r2: int = 32
    alpha: float = 1.0  # the paper scales by alpha / r: pass that product here
    keep: int | None = None  # GeneratorConfig.keep: top singular directions of S_hat (paper: r/8)
    kv_source: str = "input"  # GeneratorConfig.kv_source: "residual" is the paper's geometry
    targets: tuple[str, ...] = ("o_proj", "down_proj")
    chunk_tokens: int = 512
    pairing: str | None = None  # GeneratorConfig.pairing; None: init_from's, or "same" if fresh
    seed: int = 0
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    context_min: int = 128
    context_max: int = 1024
    target_tokens: int = 256
    qa_distractors: int = 2  # up to this many other entities around the one asked about
    # The complement tasks (complement.py): the memory's budget as fractions of the document,
    # its selectable blocks (tokens), and the teacher's answer length (tokens).
    memory_budgets: tuple[float, ...] = (0.1, 0.25)
    memory_block: int = 32
    answer_tokens: int = 24
    task_mix: dict = field(
        default_factory=lambda: {"completion": 0.5, "reconstruction": 0.5, "qa": 0.0}
    )
    dtype: str = "bfloat16"
    device: str | None = None
    eval_interval: int = 200
    eval_samples: int = 16
    eval_qa_documents: int = 0  # >0: also the harness's document-QA suite (dev) on this many
    checkpoint_interval: int = 50
    log_interval: int = 10
    max_minutes: float | None = None  # checkpoint and stop after this much wall time
    stop_after: int | None = None  # checkpoint and stop after this many steps of this run


# -- data ---------------------------------------------------------------------------------------


def answer_sample(tokenizer, context: str, message: str, answer: str) -> Sample:
    """`context` absorbed (empty: none), then `message` as a chat user turn; only the assistant's
    `answer` and its end-of-turn token are scored."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
    )
    p = tokenizer.encode(prompt, add_special_tokens=False)
    a = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    absorbed = tokenizer.encode(context, add_special_tokens=False) if context else []
    return Sample("qa", absorbed, p + a, [-100] * len(p) + a)


def draw_sample(cfg: TrainConfig, corpus: Corpus, tokenizer, rng: np.random.Generator) -> Sample:
    tasks = list(cfg.task_mix)
    probs = np.asarray([cfg.task_mix[t] for t in tasks], dtype=float)
    task = tasks[rng.choice(len(tasks), p=probs / probs.sum())]
    if task in COMPLEMENT_TASKS:
        return draw_complement(cfg, corpus, tokenizer, rng, task)
    if task == "qa":
        distractors = int(rng.integers(0, cfg.qa_distractors + 1))
        ex = make_example(random.Random(int(rng.integers(1 << 62))), distractors=distractors)
        return answer_sample(tokenizer, ex.document, ex.question, ex.answer)
    n_ctx = int(rng.integers(cfg.context_min, cfg.context_max + 1))
    T = cfg.target_tokens
    if task == "completion":
        seg = corpus.segment(rng, n_ctx + T)
        context, target = seg[:n_ctx], seg[n_ctx:]
    elif task == "reconstruction":
        context = corpus.segment(rng, max(n_ctx, T))
        start = int(rng.integers(0, len(context) - T + 1))
        target = context[start : start + T]
    else:
        raise ValueError(f"unknown task {task!r}")
    return Sample(task, context, target, target)


# -- the loop -----------------------------------------------------------------------------------


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def save_checkpoint(path: Path, generator, optimizer, step: int, stats: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "generator": generator.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "stats": stats,
        },
        tmp,
    )
    os.replace(tmp, path)  # a crash mid-save keeps the previous checkpoint


def main(argv=None) -> None:
    cfg = parse_config(argv)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    rank, world = 0, 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    base = load_base(cfg.base, device=cfg.device, dtype=cfg.dtype)
    gcfg = GeneratorConfig(
        targets=tuple(cfg.targets),
        r1=cfg.r1,
        r2=cfg.r2,
        alpha=cfg.alpha,
        keep=cfg.keep,
        kv_source=cfg.kv_source,
        chunk_tokens=cfg.chunk_tokens,
        pairing=cfg.pairing or "same",
        seed=cfg.seed,
    )
    if cfg.init_from:
        generator = Generator.from_pretrained(cfg.init_from, base.fingerprint)
        if cfg.pairing:
            generator.set_pairing(cfg.pairing)
    else:
        generator = Generator.for_base(base.model, gcfg)
    model = AdaptedModel(base, generator, chunk_tokens=cfg.chunk_tokens)
    complementing = any(cfg.task_mix.get(t) for t in COMPLEMENT_TASKS)
    if complementing:
        model.memory_block = cfg.memory_block  # the memory's blocks the budget selects among
    generator.train().requires_grad_(True)
    params = list(generator.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_set, dev_set = Corpus(cfg.data_dir, "train"), Corpus(cfg.data_dir, "dev")

    step, stats = 0, {"tokens": 0, "seconds": 0.0}
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=model.device, weights_only=False)
        generator.load_state_dict(state["generator"])
        optimizer.load_state_dict(state["optimizer"])
        step, stats = state["step"], state["stats"]
        log.info("resumed from %s at step %d", ckpt, step)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log_file = (out / "log.jsonl").open("a")

    autocast = torch.autocast(
        model.device.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32"
    )
    start = time.perf_counter() - stats["seconds"]
    first_step = step
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=rank != 0)
    window: dict[str, list[float]] = {}
    grad_norms: list[float] = []
    while step < cfg.steps:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(cfg, step)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            rng = np.random.default_rng([cfg.seed, rank, step, micro])
            samples = [
                draw_sample(cfg, train_set, model.tokenizer, rng) for _ in range(cfg.batch_size)
            ]
            per_sample: list[float] = []
            with autocast:
                loss = batch_loss(model, samples, per_sample, cfg.answer_tokens)
            (loss / cfg.grad_accum).backward()
            for s, sample_loss in zip(samples, per_sample):
                window.setdefault(s.task, []).append(sample_loss)
                stats["tokens"] += len(s.context) + len(s.target)
        if distributed:  # data parallel: average gradients over ranks
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        # The norm before clipping is logged: the polar factor's backward can spike (polar.py).
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
        optimizer.step()
        step += 1
        stats["seconds"] = time.perf_counter() - start
        bar.update(1)
        if rank == 0 and (step % cfg.log_interval == 0 or step == cfg.steps):
            row = {
                "kind": "train",
                "step": step,
                "lr": lr_at(cfg, step - 1),
                "grad_norm": max(grad_norms),  # the largest since the last row
                "tokens": stats["tokens"] * world,
                "seconds": round(stats["seconds"], 1),
                **{t: float(np.mean(v)) for t, v in window.items()},
            }
            window, grad_norms = {}, []
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in cfg.task_mix})
        timed_out = (cfg.max_minutes is not None and stats["seconds"] > 60 * cfg.max_minutes) or (
            cfg.stop_after is not None and step - first_step >= cfg.stop_after
        )
        if rank == 0 and (step % cfg.eval_interval == 0 or step == cfg.steps or timed_out):
            generator.eval()
            with autocast:
                ev = evaluate(model, cfg, dev_set)
                if complementing:
                    ev.update(evaluate_complement(model, cfg, dev_set))
            if cfg.eval_qa_documents:  # greedy decoding in float32: bf16 decode is slow on CPU
                ev.update(evaluate_qa(model, cfg.eval_qa_documents))
            generator.train()
            log_file.write(json.dumps({"kind": "eval", "step": step, **ev}) + "\n")
            log_file.flush()
            qa = ", ".join(f"{k} {v:.2f}" for k, v in ev.items() if k.startswith("qa_contains"))
            tqdm.write(
                f"step {step}: dev loss base {ev['base']:.3f} adapter {ev['adapter']:.3f}"
                f" prompt {ev['prompt']:.3f} (recovered {ev['recovered']:.2f}),"
                f" other document {ev.get('adapter_other', float('nan')):.3f};"
                f" reconstruction {ev['recon_adapter']:.3f}"
                f" (other {ev.get('recon_other', float('nan')):.3f}) {qa}"
            )
        if rank == 0 and (step % cfg.checkpoint_interval == 0 or step == cfg.steps or timed_out):
            save_checkpoint(ckpt, generator, optimizer, step, stats)
        if timed_out:
            break
    bar.close()
    if distributed:  # every rank must hold the same weights after the same updates
        prints = [None] * world
        dist.all_gather_object(prints, generator.fingerprint())
        if len(set(prints)) != 1:
            raise RuntimeError(f"ranks diverged: {prints}")
        log.info("all %d ranks hold generator %s", world, prints[0])
    if rank == 0:
        finish(cfg, out, generator, base.fingerprint, step, stats, model.device)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def finish(cfg, out: Path, generator, base_fingerprint, step, stats, device) -> None:
    """Write the generator with its provenance, and the loss curves."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    generator.config.extra = {
        "train_config": asdict(cfg),
        "steps": step,
        "tokens": stats["tokens"],
        "wall_seconds": round(stats["seconds"], 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "data": json.loads((Path(cfg.data_dir) / "summary.json").read_text()),
        "last_eval": evals[-1] if evals else None,
    }
    generator.save_pretrained(out / "generator", base_fingerprint, dtype=torch.bfloat16)
    plot_curves(out / "log.jsonl", out / "loss.png")
    log.info("wrote %s", out / "generator")


def parse_config(argv) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="JSON file of TrainConfig values")
    known, rest = p.parse_known_args(argv)
    values = json.loads(Path(known.config).read_text()) if known.config else {}
    # Any field can be overridden: --steps 500 --task_mix '{"completion": 1}'
    it = iter(rest)
    for flag in it:
        key = flag.lstrip("-").replace("-", "_")
        if key not in TrainConfig.__dataclass_fields__:
            p.error(f"unknown option {flag}")
        raw = next(it)
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    unknown = set(values) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        p.error(f"unknown config keys: {sorted(unknown)}")
    cfg = TrainConfig(**values)
    cfg.targets = tuple(cfg.targets)
    cfg.memory_budgets = tuple(cfg.memory_budgets)
    return cfg


if __name__ == "__main__":
    main()
