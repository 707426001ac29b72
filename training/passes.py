"""The model passes of training: token shards, samples, the context pass that builds a state with
its graph, and the target pass that scores under it (train.py, complement.py, the probes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genadapter.layers import bound
from genadapter.model import AdaptedModel
from genadapter.state import normalize_svd

# -- data ---------------------------------------------------------------------------------------


class Corpus:
    """Flat token shards from prepare_data.py; segments are drawn uniformly over tokens."""

    def __init__(self, data_dir: str, split: str):
        d = Path(data_dir)
        if not (d / f"{split}.tokens.npy").is_file():
            raise FileNotFoundError(f"no {split} shards in {d}: run training/prepare_data.py")
        self.tokens = np.load(d / f"{split}.tokens.npy", mmap_mode="r")
        self.offsets = np.load(d / f"{split}.offsets.npy")
        self.lengths = np.diff(self.offsets)

    def segment(self, rng: np.random.Generator, length: int) -> list[int]:
        """A random span of `length` tokens inside one document (shorter documents skipped)."""
        ok = np.flatnonzero(self.lengths >= length)
        if len(ok) == 0:
            raise ValueError(f"no document has {length} tokens")
        weights = self.lengths[ok] - length + 1
        doc = ok[rng.choice(len(ok), p=weights / weights.sum())]
        start = self.offsets[doc] + rng.integers(0, self.lengths[doc] - length + 1)
        return self.tokens[start : start + length].astype(np.int64).tolist()


@dataclass
class Sample:
    task: str
    context: list[int]
    target: list[int]  # the tokens fed in the target pass
    labels: list[int]  # target tokens to score, -100 where not scored
    # The complement tasks (complement.py): the ids the memory is laid out after, the text its
    # blocks are selected for (None: the latest within the budget) and the budget in tokens.
    header: list[int] = field(default_factory=list)
    query: str | None = None
    budget: int = 0
    answers: list[str] = field(default_factory=list)  # gold answers of a chat (empty: none)


# -- model passes -------------------------------------------------------------------------------


def context_states(model: AdaptedModel, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Per sample, S = sum of K^T V over its context chunks: name -> (B, r1, r2), with grad.
    Each chunk is encoded after the model's encoding_prefix, whose tokens enter no sum, exactly
    as absorbing encodes it (AdaptedModel._encode_batch): training sees the states it ships."""
    prefix = model.encoding_prefix
    p = len(prefix)
    chunks, owner = [], []
    for i, s in enumerate(samples):
        for k in range(0, len(s.context), model.chunk_tokens):
            chunks.append(prefix + s.context[k : k + model.chunk_tokens])
            owner.append(i)
    width = max(map(len, chunks))
    ids = torch.full((len(chunks), width), model.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, c in enumerate(chunks):
        ids[j, : len(c)] = torch.tensor(c)
        mask[j, : len(c)] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    summed = mask.clone()
    summed[:, :p] = 0
    owner_t = torch.tensor(owner, device=model.device)
    sums: dict[str, torch.Tensor] = {}
    with bound(model.binding, sums=sums, token_mask=summed):
        model.base.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    B = len(samples)
    return {
        n: torch.zeros(B, *s.shape[1:], device=s.device, dtype=s.dtype).index_add(0, owner_t, s)
        for n, s in sums.items()
    }


def target_loss(
    model: AdaptedModel,
    samples: list[Sample],
    s_hat: dict[str, torch.Tensor] | None,
    per_sample_out: list[float] | None = None,
) -> torch.Tensor:
    """Mean next-token loss over the scored target tokens, under s_hat (None: the base); each
    sample's own mean is appended to `per_sample_out` when given (for the per-task log)."""
    width = max(len(s.target) for s in samples)
    ids = torch.full((len(samples), width), model.tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, : len(s.target)] = torch.tensor(s.target)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
        mask[i, : len(s.target)] = 1
    ids, labels, mask = ids.to(model.device), labels.to(model.device), mask.to(model.device)
    with bound(model.binding, s_hat=s_hat):
        logits = model.base(input_ids=ids, attention_mask=mask, use_cache=False).logits
    labels = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="none")
    scored = (labels != -100).float()
    per_sample = (nll.view_as(scored) * scored).sum(1) / scored.sum(1).clamp_min(1)
    if per_sample_out is not None:
        per_sample_out.extend(per_sample.tolist())
    return nll.sum() / scored.sum().clamp_min(1)


def adapter_loss(
    model: AdaptedModel, samples: list[Sample], per_sample_out: list[float] | None = None
) -> torch.Tensor:
    S = context_states(model, samples)
    keep = model.generator.config.keep
    s_hat = {n: normalize_svd(s, keep) for n, s in S.items()}
    return target_loss(model, samples, s_hat, per_sample_out)


def common_suffix(a: list[int], b: list[int]) -> int:
    """How many tokens `a` and `b` share at their ends."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n
