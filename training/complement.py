"""Stage 2 of issue 24: the adapter as the context memory's complement.

* student: the base, reading the session's memory at a small budget (a fraction of the document's
  tokens, TrainConfig.memory_budgets, in blocks of TrainConfig.memory_block tokens), with the
  adapter state of the whole document;
* teacher: the base with the whole document in the prompt before the text, no adapter (the ids
  the memory's layout has at full budget);
* loss: KL(teacher || student) over the vocabulary at every position of the text after the
  document (the continuation; or the message, the chat template and the teacher's own greedy
  answer, replaced by the gold answer where the chat has one and the teacher's misses it),
  averaged over positions.

Two tasks (TrainConfig.task_mix):

* `complement`: a corpus span of n_ctx tokens absorbed, the next target_tokens after it as raw
  text; the memory reads its latest blocks within the budget (the text is no query), as
  Session.text_layout does;
* `complement_chat`: a distill_sources.mixed item (document QA, a user's facts, a general
  question with an unrelated document absorbed); the memory reads the blocks the message selects,
  laid out as Session.chat_layout lays them out.

When a turn reads nothing (the message selects no block), the student is the plain chat under the
adapter, as a session answers; the loss then covers the positions whose text the two share.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from distill_sources import evalstyle, mixed
from passes import Corpus, Sample, adapter_loss, common_suffix, context_states
from transformers import DynamicCache

from genadapter.eval.metrics import best_of, contains_match
from genadapter.generation import SamplingParams, generate_ids, prefill
from genadapter.layers import bound
from genadapter.memory import ContextMemory, encoding_prefix, fraction_budget, split_template
from genadapter.memory_read import SEPARATOR, Layout
from genadapter.session import Session
from genadapter.state import normalize_svd

COMPLEMENT_TASKS = ("complement", "complement_chat")


def draw_complement(cfg, corpus: Corpus, tokenizer, rng: np.random.Generator, task: str) -> Sample:
    """One complement sample: `context` the document's ids, `target` the text after it (for chat,
    without the answer: the teacher writes it), `header` what the memory follows, `query` the
    message (None for raw text) and `budget` in tokens (at least one block)."""
    fraction = float(rng.choice(cfg.memory_budgets))
    if task == "complement":
        n_ctx = int(rng.integers(cfg.context_min, cfg.context_max + 1))
        seg = corpus.segment(rng, n_ctx + cfg.target_tokens)
        context, target, header, query = seg[:n_ctx], seg[n_ctx:], encoding_prefix(tokenizer), None
        answers = []
    elif task == "complement_chat":
        item = mixed(random.Random(int(rng.integers(1 << 62))))
        context = tokenizer.encode(item.document, add_special_tokens=False)
        header, rest = split_template(tokenizer, [{"role": "user", "content": item.message}])
        target = tokenizer.encode(SEPARATOR + rest, add_special_tokens=False)
        query, answers = item.message, item.answers
    else:
        raise ValueError(f"unknown complement task {task!r}")
    budget = fraction_budget(fraction, len(context), cfg.memory_block)
    return Sample(
        task, context, target, [], header=header, query=query, budget=budget, answers=answers
    )


@torch.no_grad()
def absorbed(model, context: list[int]):
    """(AdapterState, ContextMemory) absorbing `context` (token ids) builds: one document, on
    the inference path (AdaptedModel.encode_chunks)."""
    memory = model.new_memory()
    if memory is None:
        raise ValueError("the complement tasks need a model that keeps a context memory")
    step = model.chunk_tokens
    chunks = [context[k : k + step] for k in range(0, len(context), step)]
    state = model.encode_chunks(chunks, memory=memory)
    memory.documents, memory.version = 1, memory.version + 1
    return state, memory


def plain_ids(model, sample: Sample) -> list[int]:
    """What a session lays out when its turn reads no memory: the chat without the document,
    or, for raw text, the text alone."""
    if sample.query is None:
        return list(sample.target)
    messages = [{"role": "user", "content": sample.query}]
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return model.tokenizer.encode(text, add_special_tokens=False)


def student_layout(model, sample: Sample, memory: ContextMemory, answer: list[int]) -> Layout:
    """The sample's text after what the memory reads at its budget, as a session lays it out."""
    read = Session(model, None, memory=memory).read(sample.query, len(sample.header), sample.budget)
    if read is None:
        return Layout([], None, plain_ids(model, sample) + answer)
    return Layout(sample.header, read, sample.target + answer)


def teacher_layout(sample: Sample) -> Layout:
    """The sample's text with the whole document in the prompt before it: the ids the memory's
    layout has at full budget, computed as a prompt (chunks are not encoded apart)."""
    return Layout([], None, sample.header + sample.context + sample.target)


def teacher_answer(model, ids: list[int], answers: list[str], answer_tokens: int) -> list[int]:
    """The teacher's greedy answer to the chat `ids` (at most answer_tokens, with the end of its
    turn when it stopped), unless the sample has gold `answers` and the teacher's contains none
    of them: then the first gold answer and the end of turn, so that the KL scores the teacher's
    distribution on the document's answer instead of teaching its mistake."""
    eos = model.tokenizer.eos_token_id
    answer = list(generate_ids(model, ids, None, SamplingParams(max_new_tokens=answer_tokens)))
    text = model.tokenizer.decode(answer, skip_special_tokens=True)
    if answers and not best_of(contains_match, text, answers):
        return model.tokenizer.encode(answers[0], add_special_tokens=False) + [eos]
    return answer + [eos] if len(answer) < answer_tokens else answer


def kl_rows(teacher: torch.Tensor, student: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Per row, the mean over its last `lengths[i]` positions of KL(teacher || student): logits
    (B, T, vocab), rows left-padded (prefill). -> (B,) float32."""
    out = []
    for i, n in enumerate(lengths):
        t = torch.log_softmax(teacher[i, -n:].float(), -1)
        s = torch.log_softmax(student[i, -n:].float(), -1)
        out.append((t.exp() * (t - s)).sum(-1).mean())
    return torch.stack(out)


def complement_loss(
    model, samples: list[Sample], s_hat: dict[str, torch.Tensor] | None, answer_tokens: int = 24
) -> torch.Tensor:
    """(B,) KL(teacher || student) per sample, student under `s_hat` (name -> (B, r1, r2), with
    grad; None: the memory alone). Chat samples first get the teacher's greedy answer."""
    memories = [absorbed(model, s.context)[1] for s in samples]
    teachers, students = [], []
    for s, memory in zip(samples, memories, strict=True):
        teacher = teacher_layout(s)
        answer = []
        if s.query is not None:
            answer = teacher_answer(model, teacher.rest, s.answers, answer_tokens)
            teacher.rest = teacher.rest + answer
        teachers.append(teacher)
        students.append(student_layout(model, s, memory, answer))
    lengths = [common_suffix(t.rest, s.rest) for t, s in zip(teachers, students, strict=True)]
    with torch.no_grad():
        _, t_logits = prefill(model, teachers, DynamicCache(), logits_to_keep=0)
    with bound(model.binding, s_hat=s_hat):
        _, s_logits = prefill(model, students, DynamicCache(), logits_to_keep=0)
    return kl_rows(t_logits, s_logits, lengths)


def batch_loss(model, samples: list[Sample], per_sample_out: list[float], answer_tokens: int):
    """The loss of one micro-batch that may mix stage-1 tasks (passes.adapter_loss, the mean
    NLL per target token) and complement tasks (the mean KL per position): each sample weighs
    1 / len(samples); a batch of stage-1 tasks alone gives adapter_loss itself. Each sample's
    own loss is appended to `per_sample_out`, in order."""
    per: list[float] = [0.0] * len(samples)
    plain = [i for i, s in enumerate(samples) if s.task not in COMPLEMENT_TASKS]
    complementing = [i for i, s in enumerate(samples) if s.task in COMPLEMENT_TASKS]
    total = torch.zeros((), device=model.device)
    if plain:
        values: list[float] = []
        total = total + adapter_loss(model, [samples[i] for i in plain], values) * len(plain)
        for i, v in zip(plain, values, strict=True):
            per[i] = v
    if complementing:
        chosen = [samples[i] for i in complementing]
        keep = model.generator.config.keep
        s_hat = {n: normalize_svd(v, keep) for n, v in context_states(model, chosen).items()}
        kl = complement_loss(model, chosen, s_hat, answer_tokens)
        total = total + kl.sum()
        for i, v in zip(complementing, kl.tolist(), strict=True):
            per[i] = v
    per_sample_out.extend(per)
    return total / len(samples)


# -- dev evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_complement(model, cfg, corpus: Corpus, qa_items: int = 8) -> dict:
    """Dev figures at each budget b of cfg.memory_budgets, on the inference path (AdaptedModel
    .encode_chunks's state and memory, bound as a session binds them):

    * `b{pct}_{method}` and `b{pct}_{method}_kl`: NLL per token of cfg.eval_samples corpus
      continuations (target_tokens after 512 context tokens; the first target token is not
      scored: no method has its logits) and KL(teacher || method), for `memory` (the memory read
      at b), `memory+adapter` and `memory+other` (the next span's adapter state: the
      wrong-document control); `b_teacher` (the document in the prompt) and `b_base` (no
      context) once, on the same spans (evaluate's `base` and `prompt` score other spans);
    * `b{pct}_qa_{method}`: the share of `qa_items` held-out questions (distill_sources.evalstyle:
      the evaluation's generator at seeds that are neither its test nor dev split) whose greedy
      answer contains a gold answer, for the same methods (model.memory_fraction = b), and
      `qa_memory_whole`: the memory at the model's whole budget, no adapter."""
    rng = np.random.default_rng([cfg.seed, 424_242])
    header = encoding_prefix(model.tokenizer)
    spans = [corpus.segment(rng, 512 + cfg.target_tokens) for _ in range(cfg.eval_samples)]
    docs = [(s[:512], s[512:]) for s in spans]
    encoded = [absorbed(model, ctx) for ctx, _ in docs]
    out: dict[str, float] = {}

    def add(key: str, value: float, n: int) -> None:
        out[key] = out.get(key, 0.0) + value / n

    n = len(docs)
    for i, (ctx, target) in enumerate(docs):
        state, memory = encoded[i]
        other = encoded[(i + 1) % n][0]
        sample = Sample("complement", ctx, target, [], header=header)
        teacher = _logits(model, [teacher_layout(sample)], None)
        add("b_teacher", _nll(teacher, target), n)
        add("b_base", _nll(_logits(model, [Layout([], None, target)], None), target), n)
        for fraction in cfg.memory_budgets:
            sample.budget = fraction_budget(fraction, len(ctx), cfg.memory_block)
            layout = student_layout(model, sample, memory, [])
            for method, s in (("memory", None), ("memory+adapter", state), ("memory+other", other)):
                logits = _logits(model, [layout], s)
                key = f"b{round(100 * fraction)}_{method}"
                add(key, _nll(logits, target), n)
                add(key + "_kl", kl_rows(teacher, logits, [len(target)]).item(), n)
    qrng = random.Random(cfg.seed + 77)
    items = [evalstyle(qrng) for _ in range(qa_items)]
    states = [
        absorbed(model, model.tokenizer.encode(it.document, add_special_tokens=False))
        for it in items
    ]
    saved = model.memory_fraction
    try:
        for i, item in enumerate(items):
            state, memory = states[i]
            other = states[(i + 1) % len(items)][0]
            runs = [("qa_memory_whole", None, None)]
            for fraction in cfg.memory_budgets:
                pct = round(100 * fraction)
                runs += [
                    (f"b{pct}_qa_memory", None, fraction),
                    (f"b{pct}_qa_memory+adapter", state, fraction),
                    (f"b{pct}_qa_memory+other", other, fraction),
                ]
            for key, s, fraction in runs:
                model.memory_fraction = fraction  # Session.read: that share, at least a block
                answer = Session(model, s, memory=memory).chat(
                    item.message, max_new_tokens=cfg.answer_tokens
                )
                add(key, best_of(contains_match, answer, item.answers), len(items))
    finally:
        model.memory_fraction = saved
    return out


def _logits(model, layouts: list[Layout], state) -> torch.Tensor:
    if layouts[0].read is None:  # model.logits binds the state itself
        return model.logits(torch.tensor([layouts[0].rest]), [state])
    with model.bind_states([state]):
        return prefill(model, layouts, DynamicCache(), logits_to_keep=0)[1].float()


def _nll(logits: torch.Tensor, target: list[int]) -> float:
    """NLL per token of target[1:] from the logits of the last len(target) positions."""
    n = len(target)
    scored = logits[0, -n:-1].float()
    return torch.nn.functional.cross_entropy(
        scored, torch.tensor(target[1:], device=scored.device)
    ).item()


def main(argv=None) -> None:
    """Print a generator's complement-stage dev figures (evaluate_complement) as JSON:

    python training/complement.py --generator training/runs/paper-s12/generator
    """
    import argparse
    import json
    from types import SimpleNamespace

    from genadapter.base import load_base
    from genadapter.generator import Generator
    from genadapter.model import AdaptedModel

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--generator", required=True, help="a trained generator folder")
    p.add_argument(
        "--config",
        default="training/configs/smollm2-135m-complement.json",
        help="the training config whose dev spans, budgets and sizes to use",
    )
    p.add_argument("--qa-items", type=int, default=8, help="held-out questions to answer")
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    values = {"seed": 0, **json.loads(Path(args.config).read_text())}  # TrainConfig's seed
    cfg = SimpleNamespace(**values)
    base = load_base(None, device="cpu", dtype=torch.bfloat16)
    generator = Generator.from_pretrained(args.generator, base.fingerprint)
    model = AdaptedModel(base, generator, memory_block=cfg.memory_block)
    figures = evaluate_complement(model, cfg, Corpus(cfg.data_dir, "dev"), args.qa_items)
    text = json.dumps({"generator": args.generator, **figures}, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
