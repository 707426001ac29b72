"""The vocabulary suite: does absorbing a glossary make the model use its rare terms, and which way
of merging several glossaries' adapters keeps them?

Glossaries of rare FOLDOC / GCIDE terms (glossary.py). Two measures per term, under each condition:
* term NLL: mean negative log-likelihood per token of the term's own tokens, in held-out sentences
  that use it (lower is better);
* defines:  whether the greedy answer to "What is X?" (chat template, as every suite asks) holds a
  key word of X's definition (higher is better).
Conditions:
* base      no context;            prompt   the term's glossary before the question / sentence;
* adapter   one session per glossary, absorbing it (the runner's name for absorbed context);
* sum       one state holding every glossary: genadapter.merge(sessions, "sum");
* state M   the glossaries' states merged by method M (TIES, DARE; those of the LoRA methods run);
* lora M    each glossary's session exported as a LoRA (adapters/export.py), the LoRAs merged by
            method M (genadapter.merge), loaded by PEFT onto the plain transformers base, as a
            user of another engine would. Methods: adapters/merging.py; weights 1 (mean: 1/n),
            density 0.5;
* memory    the glossary's session's context memory alone (memory.py); memory+adapter with its
            state (both when the model keeps memories)."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters.export import ExportError, session_lora
from ..adapters.merging import merge
from ..session import Session
from . import metrics
from .completion import logits_under
from .glossary import Glossary, Term, glossaries

log = logging.getLogger(__name__)

STATE_MERGES = ("ties", "dare_linear")
DENSITY = 0.5
BATCH = 8  # sequences per scoring forward


def question(term: Term) -> str:
    return f"What is {term.word}?"


def _stem(word: str) -> str:
    return word[:-2] if word.endswith("es") else word[:-1] if word.endswith("s") else word


def defines(answer: str, keywords: Sequence[str]) -> float:
    """1.0 when a key word is one of the answer's words, up to a plural -s / -es."""
    words = {_stem(w) for w in metrics.normalize_answer(answer).split()}
    return float(any(_stem(k) in words for k in keywords))


def _chat_ids(tokenizer, message: str) -> list[int]:
    """A one-message conversation under the chat template, as Session.chat sends it."""
    messages = [{"role": "user", "content": message}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def term_positions(tokenizer, prefix: str, sentence: str, word: str) -> tuple[list[int], list[int]]:
    """Token ids of prefix + newline + sentence, and the positions of the tokens that overlap the
    first use of `word` in the sentence (case-insensitive unless word is an acronym or mixed case,
    as glossary._uses matched it). The newline gives a term at the start a token to follow."""
    text = f"{prefix}\n{sentence}"
    lowered = word[1:].islower()
    hay, needle = (text.lower(), word.lower()) if lowered else (text, word)
    start = hay.index(needle, len(prefix))
    end = start + len(word)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    positions = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return enc["input_ids"], [p for p in positions if p > 0]


def _nll(forward: Callable, items: list[tuple[list[int], list[int]]], pad: int) -> list[float]:
    """Mean NLL of the listed positions of each sequence; forward(ids, mask) -> logits."""
    out = []
    for i in range(0, len(items), BATCH):
        chunk = items[i : i + BATCH]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (seq, _) in enumerate(chunk):  # right padding: no real token attends to it
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.no_grad():
            logp = forward(ids, mask).float().log_softmax(-1)
        for row, (seq, positions) in enumerate(chunk):
            nll = [-logp[row, p - 1, seq[p]].item() for p in positions]
            out.append(sum(nll) / len(nll))
    return out


class _Condition:
    """How one condition scores sequences and answers questions, for the terms of a glossary."""

    def __init__(self, nll: Callable, answer: Callable, prompted: bool = False):
        self.nll, self.answer, self.prompted = nll, answer, prompted


def _genadapter(model, state_of: Callable, max_new_tokens: int, prompted=False) -> _Condition:
    pad = model.tokenizer.pad_token_id

    def nll(g: int, items):
        state = state_of(g)
        return _nll(lambda ids, mask: model.logits(ids, [state] * len(ids), mask), items, pad)

    def answer(g: int, message: str) -> str:
        state = state_of(g)
        session = model.session() if state is None else Session(model, state)
        return session.chat(message, max_new_tokens=max_new_tokens)

    return _Condition(nll, answer, prompted)


def _with_memory(model, session_of: Callable, max_new_tokens: int) -> _Condition:
    """A glossary's session with its context memory: each sentence scored after the memory laid
    out as Session.text_layout lays it out (the latest blocks within the budget: a sentence is
    no query), and questions answered by the session's chat, which reads it."""

    def nll(g: int, items):
        session, out = session_of(g), []
        for ids, positions in items:
            logp = logits_under(model, ids, session.state, session.memory).log_softmax(-1)
            nll = [-logp[p - 1, ids[p]].item() for p in positions]
            out.append(sum(nll) / len(nll))
        return out

    def answer(g: int, message: str) -> str:
        session = session_of(g)
        session.messages = []
        return session.chat(message, max_new_tokens=max_new_tokens)

    return _Condition(nll, answer)


def _peft(peft, name: str, tokenizer, max_new_tokens: int) -> _Condition:
    pad = tokenizer.pad_token_id

    def forward(ids, mask):
        peft.set_adapter(name)
        return peft(input_ids=ids.to(peft.device), attention_mask=mask.to(peft.device)).logits

    def answer(g: int, message: str) -> str:
        peft.set_adapter(name)
        ids = torch.tensor([_chat_ids(tokenizer, message)], device=peft.device)
        with torch.no_grad():
            out = peft.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return _Condition(lambda g, items: _nll(forward, items, pad), answer)


def _lora_conditions(model, sessions, merges, seed, max_new_tokens, folder: Path) -> dict:
    """'lora M' for each method: the sessions' LoRAs merged and loaded into one PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        loras = [session_lora(model, s.state) for s in sessions]
    except ExportError as e:
        log.warning("vocab: no LoRA merges (%s)", e)
        return {}
    for method in merges:
        merge(loras, method=method, density=DENSITY, seed=seed).save(folder / method)
    plain = AutoModelForCausalLM.from_pretrained(loras[0].base, dtype=model.base.dtype)
    peft = PeftModel.from_pretrained(plain.to(model.device), folder / merges[0], merges[0])
    for method in merges[1:]:
        peft.load_adapter(folder / method, adapter_name=method)
    peft.eval()
    return {f"lora {m}": _peft(peft, m, model.tokenizer, max_new_tokens) for m in merges}


def vocab_rows(
    model,
    n_glossaries: int,
    terms_per_glossary: int,
    lora_merges: Sequence[str],
    max_new_tokens: int,
    seed: int,
    split: str = "test",
    progress: bool = True,
) -> list[dict]:
    """The suite's two rows, "vocab term NLL" and "vocab defines", each with every condition's
    mean over the terms, its seconds, and one record per term (answers and NLLs)."""
    glossed = glossaries(max(2, n_glossaries), terms_per_glossary, seed, split)
    if len(glossed) < 2:
        raise ValueError(f"only {len(glossed)} glossaries of rare terms in the {split} split")
    start = time.perf_counter()
    sessions = []
    for g in glossed:
        sessions.append(model.session())
        sessions[-1].absorb(g.text)
    absorb_seconds = time.perf_counter() - start
    summed = merge(sessions, method="sum")
    conditions = {
        "base": _genadapter(model, lambda g: None, max_new_tokens),
        "prompt": _genadapter(model, lambda g: None, max_new_tokens, prompted=True),
        "adapter": _genadapter(model, lambda g: sessions[g].state, max_new_tokens),
        "sum": _genadapter(model, lambda g: summed, max_new_tokens),
    }
    if model.memory_storage is not None:  # the glossary's memory, alone and with its state
        memory_of = lambda g: sessions[g].memory  # noqa: E731
        conditions["memory"] = _with_memory(
            model, lambda g: Session(model, memory=memory_of(g)), max_new_tokens
        )
        conditions["memory+adapter"] = _with_memory(
            model, lambda g: Session(model, sessions[g].state, memory=memory_of(g)), max_new_tokens
        )
    for method in [m for m in STATE_MERGES if m in lora_merges]:
        state = merge(sessions, method=method, density=DENSITY, seed=seed)
        conditions[f"state {method}"] = _genadapter(model, lambda g, s=state: s, max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="genadapter-vocab-") as tmp:
        conditions.update(
            _lora_conditions(model, sessions, tuple(lora_merges), seed, max_new_tokens, Path(tmp))
        )
        records, seconds = _run(model, glossed, conditions, progress)
    return _rows(records, seconds, list(conditions), absorb_seconds, glossed)


def _run(model, glossed: list[Glossary], conditions: dict, progress: bool):
    tok = model.tokenizer
    records = [
        {"term": t.word, "source": t.source, "glossary": gi, "keywords": t.keywords}
        for gi, g in enumerate(glossed)
        for t in g.terms
    ]
    seconds = dict.fromkeys(conditions, 0.0)
    total = len(conditions) * len(glossed)
    with tqdm(total=total, desc="vocab", unit="glossary", disable=not progress) as bar:
        for name, cond in conditions.items():
            k = 0
            for gi, g in enumerate(glossed):
                start = time.perf_counter()
                prefix = g.text + "\n" if cond.prompted else ""
                items, owners = [], []
                for ti, t in enumerate(g.terms):
                    for s in t.sentences:
                        items.append(term_positions(tok, prefix, s, t.word))
                        owners.append(ti)
                nll = cond.nll(gi, items)
                for ti, t in enumerate(g.terms):
                    mine = [v for v, o in zip(nll, owners) if o == ti]
                    message = f"{g.text}\n\n{question(t)}" if cond.prompted else question(t)
                    text = cond.answer(gi, message)
                    records[k + ti][name] = {
                        "term_nll": sum(mine) / len(mine),
                        "answer": text,
                        "defines": defines(text, t.keywords),
                    }
                k += len(g.terms)
                seconds[name] += time.perf_counter() - start
                bar.update()
    return records, seconds


def _rows(records, seconds, names, absorb_seconds, glossed) -> list[dict]:
    rows = []
    for metric, label, higher in (
        ("term_nll", "vocab term NLL", False),
        ("defines", "vocab defines", True),
    ):
        methods = {
            n: {metric: sum(r[n][metric] for r in records) / len(records), "seconds": seconds[n]}
            for n in names
        }
        methods["adapter"]["absorb_seconds"] = absorb_seconds
        b, p, a = (methods[k][metric] for k in ("base", "prompt", "adapter"))
        rows.append(
            {
                "name": label,
                "metric": metric,
                "metrics": [metric],
                "higher_is_better": higher,
                "n": len(records),
                "methods": methods,
                "recovered": {metric: metrics.recovered_fraction(b, p, a)},
                "glossaries": [[t.word for t in g.terms] for g in glossed],
                "records": records,
            }
        )
    return rows
