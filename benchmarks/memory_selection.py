"""Issue 23, item 2: which memory blocks a turn reads, measured on the dev split.

Each question is answered (greedy, contains-match, the eval's QA prompt) by the same memory
under several ways of choosing what it reads, each laid out as `Session.chat_layout` lays a
read out (memory_read.py):

* lexical     the default: documents by their best block's lexical cosine with the turn, then
              IDF-ranked blocks (memory.ContextMemory.select);
* infllm max  InfLLM-style block retrieval (arXiv 2402.04617) per layer and KV head, reading as
              many tokens as the lexical read does (one short document in manydocs): a block's
              relevance is its best key's dot product with the turn's queries (averaged over the
              turn's tokens and the query heads sharing the KV head), every key at one position
              before the turn as InfLLM places its memory units; each layer and head reads its own
              blocks, best first, until the budget (the last one cut to fit);
* infllm mean the same with each block represented by its mean key (InfLLM keeps a few
              representative keys per block; the mean is the one-representative form);
* infllm max budget   the same reading the model's whole budget (1,024 tokens), as InfLLM
              reads a fixed number of blocks whatever the turn;
* lexical + epic K   the lexical read with the first K tokens of every chunk that does not start
              the read recomputed over everything read before them (EPIC, arXiv 2410.15332: the
              start of an independently encoded chunk is where its attention to the text before
              it is missing; CacheBlend, arXiv 2405.16444, picks the tokens by KV deviation);
* lexical + recompute the same with every read token recomputed: prompting with the read text,
              the ceiling of any partial recomputation.

Two departures from the papers, both stated in docs/MEMORY.md: InfLLM chooses blocks inside the
pass, with the queries of a layer that already read its lower layers' blocks, and again every
few decoded tokens; here the queries come from one pass of the turn without a memory and the
choice holds for the whole (short) answer. Recomputation runs on the float keys and values of
the read (dequantized), as EPIC recomputes over a cached prefix.

Suites: manydocs (eight qa documents absorbed separately into one session, a question about one
of them) and beyond (a stream of documents 3x the window, questions about its first third).

    .venv/bin/python benchmarks/memory_selection.py --out docs/eval/memory-selection-dev.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import genadapter
from genadapter.eval import metrics
from genadapter.eval.fictional import long_example, qa_examples
from genadapter.eval.prompts import QA_INSTRUCTION, chat_message, split_seed
from genadapter.generation import cache_kwargs
from genadapter.memory_read import Layout, MemoryRead, rotate
from genadapter.session import Session


class Chooser(Session):
    """A session whose turns read the blocks `method` chooses (see the module docstring).
    `block_ids[i]`: the token ids of memory block i, for recomputation."""

    def __init__(self, model, memory, block_ids: list[list[int]], method: str):
        super().__init__(model, memory=memory)
        self.block_ids, self.method = block_ids, method
        self.select_seconds = 0.0
        self.reads: list[list[int]] = []  # per layer and head (or one list): blocks last read
        self._keys: dict | None = None  # per layer: every memory key at one position

    def chat_layout(self, messages, max_new_tokens):
        layout = super().chat_layout(messages, max_new_tokens)
        if layout.read is None or self.method == "lexical":
            self.reads = [list(layout.read.chunks)] if layout.read is not None else []
            return layout
        start = time.perf_counter()
        if self.method.startswith("infllm"):
            budget = None if self.method.endswith("budget") else layout.read.tokens
            read = self.infllm_read(layout, "mean" in self.method, budget)
        else:
            k = None if self.method.endswith("recompute") else int(self.method.split()[-1])
            read = recompute(self.model, self.memory, self.block_ids, layout, k)
            self.reads = [list(read.chunks)]
        self.select_seconds += time.perf_counter() - start
        return Layout(layout.header, read, layout.rest)

    def _fixed(self, h_len: int):
        """Every memory key (float32) turned to position `h_len` (InfLLM gives its memory units
        one position), per layer (H, N, D); each token's block index (N,); dequantized blocks."""
        if self._keys is None or self._keys["h_len"] != h_len:
            m, memory = self.model, self.memory
            blocks = [c.dequantized(torch.float32) for c in memory.chunks]
            fixed = []
            for layer in range(m.memory_shape[0]):
                per = []
                for c, (k, _) in zip(memory.chunks, blocks, strict=True):
                    encoded = memory.prefix_len + c.offset + torch.arange(c.tokens)
                    per.append(rotate(m, k[layer], h_len - encoded))
                fixed.append(torch.cat(per, 1))
            owner = torch.cat([torch.full((c.tokens,), i) for i, c in enumerate(memory.chunks)])
            self._keys = {"h_len": h_len, "fixed": fixed, "owner": owner, "blocks": blocks}
        return self._keys

    @torch.no_grad()
    def infllm_read(self, layout: Layout, mean: bool, budget: int | None) -> MemoryRead:
        """Per layer and KV head, the blocks of best query-key relevance, best first until
        `budget` tokens (None: the model's memory_budget, or all the memory when smaller; the
        last block cut to fit), laid out in absorb order after the header."""
        m, memory = self.model, self.memory
        h_len = len(layout.header)
        if budget is None:
            room = m.max_positions - h_len - len(layout.rest) - 64
            budget = min(m.memory_budget, memory.tokens, room)
        fixed = self._fixed(h_len)
        owner, n_blocks = fixed["owner"], len(memory.chunks)
        queries = turn_queries(m, layout, budget)
        L, H, D = m.memory_shape
        keys = torch.zeros((L, H, budget, D), dtype=m.base.dtype, device=m.device)
        values = torch.zeros_like(keys)
        self.reads = []
        for layer in range(L):
            q = queries[layer]  # (QH, J, D)
            q = q.reshape(H, -1, D)  # query heads grouped by the KV head they share
            k = fixed["fixed"][layer]  # (H, N, D)
            if mean:
                sums = torch.zeros((H, n_blocks, D)).index_add_(1, owner, k)
                k_rep = sums / torch.bincount(owner, minlength=n_blocks)[None, :, None]
                scores = torch.einsum("hjd,hbd->hjb", q, k_rep).mean(1)
            else:
                s = torch.einsum("hjd,hnd->hjn", q, k)
                best = torch.full((H, s.shape[1], n_blocks), -torch.inf)
                idx = owner.expand(H, s.shape[1], -1)
                scores = best.scatter_reduce(2, idx, s, "amax").mean(1)
            for head in range(H):
                picked, used = [], 0
                for i in scores[head].argsort(descending=True).tolist():
                    if used >= budget:
                        break
                    take = min(memory.chunks[i].tokens, budget - used)
                    picked.append((i, take))
                    used += take
                self.reads.append([i for i, _ in picked])
                at = 0
                for i, take in sorted(picked):
                    c = memory.chunks[i]
                    bk, bv = fixed["blocks"][i]
                    shift = h_len + at - (memory.prefix_len + c.offset)
                    k_read = rotate(m, bk[layer, head, :take], shift)
                    keys[layer, head, at : at + take] = k_read.to(keys.dtype)
                    values[layer, head, at : at + take] = bv[layer, head, :take].to(keys.dtype)
                    at += take
        return MemoryRead(keys, values, h_len, ())


@torch.no_grad()
def turn_queries(model, layout: Layout, budget: int) -> list[torch.Tensor]:
    """Per layer, the rotated queries (query heads, rest tokens, D) float32 of the turn's rest,
    from one pass of header + rest without a memory, the rest at the positions it takes after
    `budget` read tokens."""
    base, queries, hooks = model.base, [], []
    h = len(layout.header)

    def grab(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        q = module.q_proj(x).view(*x.shape[:2], -1, module.head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        queries.append(q[0, :, h:].float())

    for layer in base.model.layers:
        hooks.append(layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        ids = torch.tensor([layout.header + layout.rest], device=model.device)
        pos = torch.cat([torch.arange(h), torch.arange(len(layout.rest)) + h + budget])
        base.model(input_ids=ids, position_ids=pos[None].to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
    return queries


def run_starts(memory, chunks: tuple[int, ...]) -> list[int]:
    """Positions (in the read) of the blocks that start a run: not the read's first, and not
    laid right after the block they follow in their encoded chunk."""
    starts, at = [], 0
    for n, i in enumerate(chunks):
        c = memory.chunks[i]
        follows = n > 0 and c.offset > 0 and chunks[n - 1] == i - 1
        if n > 0 and not follows:
            starts.append((at, c.tokens))
        at += c.tokens
    return starts


@torch.no_grad()
def recompute(model, memory, block_ids, layout: Layout, first: int | None) -> MemoryRead:
    """The lexical read with the first `first` tokens of every run start (None: every token)
    recomputed over the header and the read tokens before them (the recomputed ones among them
    in their new form): one forward of those tokens with a custom attention mask."""
    read, h = layout.read, len(layout.header)
    ids = [t for i in read.chunks for t in block_ids[i]]
    M = read.tokens
    assert len(ids) == M
    if first is None:
        picked = list(range(M))
    else:
        picked = [a + j for a, n in run_starts(memory, read.chunks) for j in range(min(first, n))]
    if not picked:
        return read
    dev, S = model.device, torch.tensor(picked)
    cache = DynamicCache()
    kw = cache_kwargs(model.base, cache)
    model.base.model(input_ids=torch.tensor([layout.header], device=dev), use_cache=True, **kw)
    for layer in range(read.keys.shape[0]):
        cache.update(read.keys[layer][None], read.values[layer][None], layer)
    allow = torch.zeros((len(picked), h + M + len(picked)), dtype=torch.bool)
    allow[:, :h] = True
    old = torch.arange(M)[None] < S[:, None]
    old[:, S] = False  # a recomputed token is read in its new form only
    allow[:, h : h + M] = old
    allow[:, h + M :] = torch.ones(len(picked), len(picked), dtype=torch.bool).tril()
    model.base.model(
        input_ids=torch.tensor([ids], device=dev)[:, S],
        position_ids=(h + S)[None].to(dev),
        attention_mask=allow[None, None].to(dev),
        use_cache=True,
        **kw,
    )
    keys, values = read.keys.clone(), read.values.clone()
    for layer, cached in enumerate(cache.layers):
        keys[layer][:, S] = cached.keys[0, :, h + M :].to(keys.dtype)
        values[layer][:, S] = cached.values[0, :, h + M :].to(keys.dtype)
    return MemoryRead(keys, values, h, read.chunks)


def absorbed(model, documents: list[str]):
    """A memory holding `documents`, each absorbed by its own call, and each block's ids."""
    session, block_ids = Session(model), []
    for document in documents:
        session.absorb(document)
        for chunk in model.chunks(document):
            block_ids += [
                chunk[a : a + model.memory_block] for a in range(0, len(chunk), model.memory_block)
            ]
    lengths = [c.tokens for c in session.memory.chunks]
    assert lengths == [len(b) for b in block_ids], "block ids do not match the memory"
    return session.memory, block_ids


def ask(model, session, question, document: int, max_new_tokens: int) -> dict:
    """One greedy answer; `hit`: the share of the read's choices (one per layer and head for
    InfLLM, else one) that include a block of the question's `document`."""
    message = chat_message(question.text, None, QA_INSTRUCTION)
    session.messages = []
    start = time.perf_counter()
    answer = session.chat(message, max_new_tokens=max_new_tokens)
    return {
        "answer": answer,
        "contains": max(metrics.contains_match(answer, a) for a in question.answers),
        "seconds": time.perf_counter() - start,
        "hit": sum(
            any(session.memory.chunks[i].document == document for i in read)
            for read in session.reads
        )
        / max(len(session.reads), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--manydocs", type=int, default=16, help="documents (groups of eight)")
    p.add_argument("--questions", type=int, default=3, help="per manydocs document")
    p.add_argument("--beyond", type=int, default=16, help="beyond questions")
    p.add_argument("--epic", type=int, nargs="*", default=[4, 16])
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--methods", nargs="*", help="run only these (default: every one)")
    args = p.parse_args()
    methods = ["lexical", "infllm max", "infllm mean", "infllm max budget"]
    methods += [f"lexical + epic {k}" for k in args.epic] + ["lexical + recompute"]
    if args.methods:
        unknown = set(args.methods) - set(methods)
        if unknown:
            p.error(f"unknown methods {sorted(unknown)}; known: {methods}")
        methods = args.methods
    model = genadapter.load()
    seed = split_seed(0, "dev")
    suites = []
    groups = qa_examples(args.manydocs, args.questions, seed)
    for at in range(0, len(groups), 8):
        members = groups[at : at + 8]
        memory, ids = absorbed(model, [e.context for e in members])
        asked = [(q, n) for n, e in enumerate(members) for q in e.questions]
        suites.append(("manydocs", memory, ids, asked))
    count = lambda text: len(model.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    length = 3 * model.max_positions
    example = long_example(length, 6 * args.beyond, seed, count)
    early = [q for q in example.questions if q.info["tokens_after"] >= 2 * length // 3]
    memory, ids = absorbed(model, example.documents)
    suites.append(("beyond", memory, ids, [(q, q.info["document"]) for q in early[: args.beyond]]))
    results: dict = {}
    for name, memory, ids, questions in suites:
        for method in methods:
            session = Chooser(model, memory, ids, method)
            rows = [ask(model, session, q, doc, args.max_new_tokens) for q, doc in questions]
            r = results.setdefault(name, {}).setdefault(method, {"rows": [], "select_s": 0.0})
            r["rows"] += rows
            r["select_s"] += session.select_seconds
            print(name, method, sum(x["contains"] for x in rows), "/", len(rows), flush=True)
    summary = {
        name: {
            m: {
                "n": len(r["rows"]),
                "contains": sum(x["contains"] for x in r["rows"]) / len(r["rows"]),
                "seconds_per_answer": sum(x["seconds"] for x in r["rows"]) / len(r["rows"]),
                "reads_own_document": sum(x["hit"] for x in r["rows"]) / len(r["rows"]),
                "select_seconds_per_answer": r["select_s"] / len(r["rows"]),
            }
            for m, r in per.items()
        }
        for name, per in results.items()
    }
    print(json.dumps(summary, indent=1))
    out = {"summary": summary, "results": results, "note": __doc__}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
