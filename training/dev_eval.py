"""Training's dev figures and curves: completion and reconstruction on held-out corpus spans,
each with the wrong-document control (issue 24), the harness's document QA, and loss.png."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from complement import COMPLEMENT_TASKS
from passes import Corpus, Sample, context_states, target_loss

from genadapter.eval.runner import LIMITS, evaluate_generator
from genadapter.model import AdaptedModel
from genadapter.state import normalize_svd


@torch.no_grad()
def evaluate(model: AdaptedModel, cfg, corpus: Corpus) -> dict:
    """Dev losses (mean NLL per target token) over `cfg.eval_samples` spans of 512 context
    tokens, each with the next `target_tokens` (completion) and a span of the context itself
    (reconstruction):

    * completion: `base` (no context), `adapter` (the context's state), `prompt` (the context in
      the prompt), `adapter_other` (another span's state: the wrong-document control) and
      `recovered`, the share of prompting's gain the adapter recovers;
    * reconstruction: `recon_adapter`, `recon_other` (another span's state), `recon_base`;
    * `own_minus_other` and `recon_own_minus_other`: the wrong-document loss less the own, the
      part of the gain that is the document's content and not its domain (issue 24).

    The wrong document of span i is span i + 1 (at least two spans); with one, the controls are
    left out."""
    rng = np.random.default_rng([cfg.seed, 999_999])
    T, n = cfg.target_tokens, cfg.eval_samples
    spans = [corpus.segment(rng, 512 + T) for _ in range(n)]
    starts = [int(rng.integers(0, 512 - T + 1)) for _ in range(n)]
    completion = [Sample("completion", s[:512], s[512:], s[512:]) for s in spans]
    recon = [
        Sample("reconstruction", s[:512], s[a : a + T], s[a : a + T]) for s, a in zip(spans, starts)
    ]
    states = [
        {
            k: normalize_svd(v, model.generator.config.keep)
            for k, v in context_states(model, [c]).items()
        }
        for c in completion
    ]
    totals: dict[str, float] = {}

    def add(key: str, value: torch.Tensor) -> None:
        totals[key] = totals.get(key, 0.0) + value.item() / n

    for i in range(n):
        add("base", target_loss(model, [completion[i]], None))
        add("adapter", target_loss(model, [completion[i]], states[i]))
        prompted = Sample("prompt", [], spans[i], [-100] * 512 + spans[i][512:])
        add("prompt", target_loss(model, [prompted], None))
        add("recon_base", target_loss(model, [recon[i]], None))
        add("recon_adapter", target_loss(model, [recon[i]], states[i]))
        if n > 1:
            other = states[(i + 1) % n]
            add("adapter_other", target_loss(model, [completion[i]], other))
            add("recon_other", target_loss(model, [recon[i]], other))
    out = dict(totals)
    out.update({f"{k}_ppl": math.exp(v) for k, v in totals.items()})
    gain = out["base"] - out["prompt"]
    out["recovered"] = (out["base"] - out["adapter"]) / gain if gain > 0 else float("nan")
    if n > 1:
        out["own_minus_other"] = out["adapter_other"] - out["adapter"]
        out["recon_own_minus_other"] = out["recon_other"] - out["recon_adapter"]
    return out


def evaluate_qa(model: AdaptedModel, documents: int) -> dict:
    """The evaluation harness's document-QA suite on dev documents, greedy, no SFT baseline."""
    limits = replace(LIMITS["small"], qa_documents=documents, qa_questions=2, sft_steps=0)
    flat = evaluate_generator(model, suites=("qa",), limit=limits, split="dev")
    return {f"qa_{k.split('/', 1)[1].replace('/', '_')}": v for k, v in flat.items()}


def plot_curves(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for task in ("completion", "reconstruction", "qa", *COMPLEMENT_TASKS):
        pts = [(r["step"], r[task]) for r in train if r.get(task) is not None]
        if pts:
            axes[0].plot(*zip(*pts), label=task, alpha=0.8)
    axes[0].set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    if axes[0].lines:
        axes[0].legend()
    keys = ["base", "adapter", "prompt", "adapter_other", "recon_adapter", "recon_other"]
    last = evals[-1] if evals else {}
    keys += [k for k in last if re.fullmatch(r"b\d+_memory(\+adapter|\+other)?", k)]
    for key in keys:  # and the complement stage's NLL per budget (complement.py)
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            style = "s--" if "recon" in key else ":" if "memory" in key else "o-"
            axes[1].plot(*zip(*pts), style, label=key)
    axes[1].set(xlabel="step", ylabel="dev loss (nats/token)", title="held-out dev documents")
    if axes[1].lines:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
