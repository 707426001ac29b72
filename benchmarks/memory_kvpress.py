"""Issue 23, item 3: do kvpress's query-agnostic presses keep a document answerable at this size?

Each dev-split qa document is prefilled as prompting lays it out (the chat header, then the
document at the start of the user message: what the context memory stores), the KV cache is
compressed by a kvpress press that has not seen the question (ExpectedAttentionPress, KVzipPress,
and KnormPress as a simple reference), and the question follows (SEPARATOR, the question and
the rest of the template) at its uncompressed positions, as kvpress's own pipeline continues.
Greedy answers of at most 24 tokens, contains-match against the reference answers.

kvpress is not a dependency of genadapter: its latest release (0.5.5) pins transformers<5.3,
and this project runs transformers 5.25, so it is installed beside the venv, without its pins:

    .venv/bin/pip install --target /tmp/kvpkg --no-deps kvpress==0.5.5
    .venv/bin/pip install --target /tmp/kvpkg "cachetools<6" "fire<0.7" datasets
    PYTHONPATH=/tmp/kvpkg .venv/bin/python benchmarks/memory_kvpress.py --out docs/eval/kvpress.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from genadapter.base import _converted_default_dir, default_gguf_path
from genadapter.eval.fictional import qa_examples
from genadapter.eval.metrics import contains_match
from genadapter.eval.prompts import QA_INSTRUCTION, chat_message, split_seed
from genadapter.memory import split_template
from genadapter.memory_read import SEPARATOR


def _adapt_to_this_transformers() -> None:
    """kvpress 0.5.5's attention hooks read `past_key_values` and `cache_position`, which
    transformers 5.25 no longer passes to attention layers (it passes `cache`): give them both,
    on every press class that defines its own hook."""
    import kvpress

    for cls in {getattr(kvpress, n) for n in dir(kvpress) if n.endswith("Press")}:
        hook = cls.__dict__.get("forward_hook")
        if hook is None or getattr(hook, "adapted", False):
            continue

        def forward_hook(self, module, inputs, kwargs, output, hook=hook):
            kwargs = dict(kwargs)
            cache = kwargs.setdefault("past_key_values", kwargs.get("cache"))
            if "cache_position" not in kwargs:
                q_len = kwargs["hidden_states"].shape[1]
                end = cache.get_seq_length(module.layer_idx)
                kwargs["cache_position"] = torch.arange(end - q_len, end)
            return hook(self, module, inputs, kwargs, output)

        forward_hook.adapted = True
        cls.forward_hook = forward_hook


def presses(ratio: float) -> dict:
    from kvpress import ExpectedAttentionPress, KnormPress, KVzipPress

    _adapt_to_this_transformers()

    return {
        f"expected attention {ratio}": ExpectedAttentionPress(compression_ratio=ratio),
        f"kvzip {ratio}": KVzipPress(compression_ratio=ratio),
        f"knorm {ratio}": KnormPress(compression_ratio=ratio),
    }


@torch.no_grad()
def answer(model, tok, header, document, question, press, new_tokens: int) -> tuple[str, int]:
    """Greedy answer with the (header + document) cache compressed by `press` (None: whole)."""
    context = torch.tensor([header + document])
    cache = DynamicCache()
    if press is None:
        model.model(input_ids=context, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=context, past_key_values=cache)
    kept = cache.get_seq_length()
    masked = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
    if press is not None and all(m is not None for m in masked):
        # KVzip in kvpress masks evicted keys per head at decode time instead of dropping them
        heads = model.config.num_key_value_heads
        dropped = sum(len(m[0]) for m in masked) / (len(masked) * heads)
        kept = context.shape[1] - dropped
    _, rest = split_template(tok, [{"role": "user", "content": question}])
    rest = tok.encode(SEPARATOR + rest, add_special_tokens=False)
    at = context.shape[1]
    position = torch.arange(at, at + len(rest))[None]
    logits = model(
        input_ids=torch.tensor([rest]), past_key_values=cache, position_ids=position
    ).logits
    out, token, pos = [], logits[0, -1].argmax(), at + len(rest)
    for _ in range(new_tokens):
        if int(token) == tok.eos_token_id or tok.decode([int(token)]) == "<|im_end|>":
            break
        out.append(int(token))
        logits = model(
            input_ids=token.view(1, 1), past_key_values=cache, position_ids=torch.tensor([[pos]])
        ).logits
        token, pos = logits[0, -1].argmax(), pos + 1
    return tok.decode(out, skip_special_tokens=True), kept - len(header)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--documents", type=int, default=16)
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--out", default="kvpress.json")
    args = p.parse_args()
    folder = _converted_default_dir(default_gguf_path())
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    examples = qa_examples(args.documents, args.questions, split_seed(0, "dev"))
    conditions = {"whole": None}
    for ratio in args.ratios:
        conditions |= presses(ratio)
    header, _ = split_template(tok, [{"role": "user", "content": "x"}])
    hits = dict.fromkeys(conditions, 0)
    kept = {c: [] for c in conditions}
    records, n, start = [], 0, time.perf_counter()
    for e in examples:
        document = tok.encode(e.context, add_special_tokens=False)
        for q in e.questions:
            message = chat_message(q.text, None, QA_INSTRUCTION)
            record = {"question": q.text, "answers": q.answers}
            for name, press in conditions.items():
                text, tokens = answer(model, tok, header, document, message, press, args.new_tokens)
                hit = max(contains_match(text, a) for a in q.answers)
                hits[name] += hit
                kept[name].append(tokens / len(document))
                record[name] = {"answer": text, "contains": hit}
            records.append(record)
            n += 1
            print(n, {k: round(v / n, 3) for k, v in hits.items()}, flush=True)
    result = {
        "questions": n,
        "split": "dev",
        "contains": {k: v / n for k, v in hits.items()},
        "kept_fraction": {k: sum(v) / len(v) for k, v in kept.items()},
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "records": records,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("questions", "contains", "kept_fraction")}, indent=1))


if __name__ == "__main__":
    main()
