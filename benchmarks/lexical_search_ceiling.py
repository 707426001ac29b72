"""How well can *any* embedding of the words find a library document from its continuation?

A reference point for the `library` suite's search accuracy (issue 14): each document's first
512 tokens are "absorbed", the next 128 are the query, as benchmarks/library_routing.py does;
here both are embedded by lexical bags (no adapter at all): sparse vectors over the tokenizer's
vocabulary, each token weighted by the base's own surprisal of it in its text (the model's IDF),
and dense variants. Accuracy@1/@5 of cosine ranking over all N documents.

    OMP_NUM_THREADS=1 python benchmarks/lexical_search_ceiling.py --split dev --n 128
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from genadapter.base import load_base
from genadapter.eval.completion import completion_documents


@torch.no_grad()
def token_stats(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (T,), the base's surprisal of each (T,) nats (the first gets the mean), and the
    residual stream entering decoder layer 8 (T, d)."""
    x = torch.tensor([ids])
    out = model(input_ids=x, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
    s = -logp.gather(-1, x[0, 1:, None])[:, 0]
    return x[0], torch.cat([s.mean().view(1), s]), out.hidden_states[8][0]


def accuracy(docs: list[torch.Tensor], queries: list[torch.Tensor]) -> str:
    d = F.normalize(torch.stack(docs), dim=-1)
    q = F.normalize(torch.stack(queries), dim=-1)
    scores = q @ d.T
    rank = (scores > scores.diag()[:, None]).sum(1)
    return f"acc@1 {(rank == 0).float().mean():.2f}  acc@5 {(rank < 5).float().mean():.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--split", default="dev", choices=["dev", "test"])
    p.add_argument("--n", type=int, default=128)
    args = p.parse_args()
    base = load_base(None, device="cpu", dtype=torch.float32)
    model, tok = base.model.eval(), base.tokenizer
    vocab, embed = model.config.vocab_size, model.get_input_embeddings().weight
    docs = completion_documents(tok, args.n, 512, 128, seed=0, split=args.split)
    D = [token_stats(model, d.context_ids) for d in docs]
    Q = [token_stats(model, d.target_ids) for d in docs]

    def bag(ids, w):
        return torch.zeros(vocab).index_add_(0, ids, w)

    variants = {
        "bag of tokens, uniform": lambda ids, s, h: bag(ids, torch.ones_like(s)),
        "bag of tokens, surprisal-weighted": lambda ids, s, h: bag(ids, s),
        "bag of tokens, surprisal^2": lambda ids, s, h: bag(ids, s**2),
        "input embeddings, surprisal-weighted": lambda ids, s, h: (s[:, None] * embed[ids]).sum(0),
        "layer-8 states, surprisal-weighted": lambda ids, s, h: (s[:, None] * h).sum(0),
    }
    print(f"{len(docs)} documents ({args.split}), query = the 128-token continuation")
    for name, f in variants.items():
        print(f"{name:40s} {accuracy([f(*x) for x in D], [f(*x) for x in Q])}", flush=True)


if __name__ == "__main__":
    main()
