"""Fixed-size embeddings of absorbed documents and of prompts, in one space per kind, for a
library's search (search.py).

"internal": from the base's layer inputs (the PHATGOOSE-style gates of routing.py). A document's
    embedding is made from its gates (the mean of each adapted layer's inputs over its tokens); a
    text's from the same means over the text read by the base. Per layer standardized, scaled by
    1/sqrt(d_in L), concatenated: (sum of d_in,) float32, so a dot product is the mean over the
    L layers of the per-layer cosines.

"behaviour": from observable behaviour only, after FUTE (unified task embeddings, 2024): how the
    model's next-token distributions over a fixed set of probe prompts (PROBES) move away from the
    base's. For an absorbed document the probes are read with its state bound and no text in the
    prompt; for a prompt or question the same probes are read by the base with the text placed
    before each of them (TEXT + SEPARATOR + probe). So a prompt and an absorbed document land in
    one space, and any base model works (only its logits are read). Per probe p the shift
        d_p = log softmax(z_p) - log softmax(z_p^base)          (vocab,)
    is centred over the vocabulary, projected by a fixed random Gaussian matrix R (vocab x
    PROJECTION_DIM, drawn from PROJECTION_SEED, so the same for every document) and scaled to
    unit norm; the P projected shifts are concatenated and divided by sqrt(P): a (P *
    PROJECTION_DIM,) float32 vector of norm 1 whose dot product with another is the mean over
    probes of the cosines of their (projected) shifts.

"lexical": from the base's reading of the words: a (vocab,) float32 vector holding, for each token
    id of the text, the largest surprisal -log p (nats) the base gave that token where it occurs,
    0 for ids the text lacks, scaled to norm 1. The text is read in the model's chunks
    (chunk_tokens), each from its start, as absorbing reads it (a chunk's first token, which has
    no prediction, gets the chunk's mean). A bag of words weighted by the model's own surprise:
    rare names and terms weigh most, as an IDF would make them, without statistics of any
    collection. A document's is made in the pass that absorbs it (Library.add); a question's by
    the same reading.

All three depend on the embedded text or state alone, never on the rest of a library."""

from __future__ import annotations

import hashlib
import weakref

import torch
from transformers import DynamicCache

from ..generation import cache_kwargs
from ..layers import bound
from ..text import DocumentError
from .routing import standardize

KINDS = ("internal", "behaviour", "lexical")
# What search uses unless told: the kind that found documents best (docs/LIBRARY.md).
DEFAULT_KIND = "lexical"

# Generic probe prompts, fixed: changing them changes BEHAVIOUR_VERSION (stored embeddings made
# with other probes are then refused as foreign). Short (1-5 tokens), so the probes of one entry
# are one forward of 16 x 5 tokens: about 0.5 s on one CPU core (32 longer probes took 1.5 s and
# searched about as well: docs/LIBRARY.md, "Embeddings, gates and routing").
PROBES = (
    "The main topic is",
    "This is about",
    "Keywords:",
    "Summary:",
    "The",
    "It was",
    "According to the text,",
    "For example,",
    "The answer is",
    "In short,",
    "Title:",
    "Category:",
    "The reason is",
    "It is a kind of",
    "Note that",
    "See also:",
)
SEPARATOR = "\n\n"
PROJECTION_DIM = 64
PROJECTION_SEED = 14
# A prompt is cut to its first TEXT_TOKENS tokens before the probes (bounds the cost of a query).
TEXT_TOKENS = 512
# /2: every window is read after the model's encoding prefix (as absorbing reads it since the
# context memory); entries with /1 embeddings count as having none (read_embedding).
LEXICAL_VERSION = "max-surprisal/2"
BEHAVIOUR_VERSION = hashlib.sha256(
    repr((PROBES, SEPARATOR, PROJECTION_DIM, PROJECTION_SEED, TEXT_TOKENS, "logp-c")).encode()
).hexdigest()[:16]

_base_logp: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_projections: dict[int, torch.Tensor] = {}


def dimension() -> int:
    """Size of a behaviour embedding: P * PROJECTION_DIM."""
    return len(PROBES) * PROJECTION_DIM


def vocab_size(model) -> int:
    """Rows of the base's LM head: the size of a lexical embedding."""
    return model.base.get_output_embeddings().weight.shape[0]


def check_kind(kind: str) -> str:
    """`kind` itself; ValueError unless it is one of KINDS."""
    if kind not in KINDS:
        raise ValueError(f"unknown embedding kind {kind!r}; use one of {', '.join(KINDS)}")
    return kind


# -- internal -------------------------------------------------------------------------------------


def internal(
    means: dict[str, torch.Tensor], center: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Layer name -> (..., d_in) mean layer inputs -> (..., sum d_in) float32: each (less the
    layer's fixed background `center` (d_in,) when given, gates.py) standardized (norm
    sqrt(d_in)), scaled by 1/sqrt(d_in L), concatenated in name order."""
    scale = len(means) ** -0.5
    parts = []
    for n in sorted(means):
        m = means[n] if center is None else means[n] - center[n]
        parts.append(standardize(m) * (scale / m.shape[-1] ** 0.5))
    return torch.cat(parts, dim=-1)


def encode_with_means(model, text: str) -> tuple[object, dict[str, torch.Tensor]]:
    """`text` absorbed: its AdapterState and, per adapted layer, the mean (d_in,) float32 of the
    inputs the layer saw meanwhile (the same context pass of Session.absorb; a document's gates).
    Raises DocumentError for empty or non-text input."""
    inputs: dict[str, torch.Tensor] = {}
    with bound(model.binding, input_sums=inputs):
        state = model.encode(text)[0]
    return state, {n: s / state.tokens for n, s in inputs.items()}


def input_means(model, text: str) -> dict[str, torch.Tensor]:
    """Per adapted layer, the mean (d_in,) float32 of the inputs it saw while the base read `text`
    (encode_with_means without the state). Raises DocumentError for empty or non-text input."""
    return encode_with_means(model, text)[1]


# -- behaviour ------------------------------------------------------------------------------------


@torch.no_grad()
def behaviour_of_state(model, state) -> torch.Tensor:
    """The behaviour embedding of an absorbed state (AdapterState): (P * PROJECTION_DIM,) float32,
    norm 1. One forward of the P probes (right-padded, one batch) with the state bound."""
    with model.bind_states([state] * len(PROBES)):
        logp = _probe_logp(model, None)
    return _embed(logp - _base(model))


@torch.no_grad()
def behaviour_of_text(model, text: str) -> torch.Tensor:
    """The behaviour embedding of a prompt: the base reads `text` (its first TEXT_TOKENS tokens)
    once, and every probe continues it from that KV cache (one batched forward of the P probes).
    (P * PROJECTION_DIM,) float32, norm 1. Raises ValueError for an empty or non-str text."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a behaviour embedding needs a non-empty text")
    ids = model.tokenizer.encode(text, add_special_tokens=False)[:TEXT_TOKENS]
    ids += model.tokenizer.encode(SEPARATOR, add_special_tokens=False)
    with model.bind_states(None):
        cache = DynamicCache()
        prefix = torch.tensor([ids], device=model.device)
        base = model.base.base_model
        base(input_ids=prefix, use_cache=True, **cache_kwargs(base, cache))
        cache.batch_repeat_interleave(len(PROBES))
        logp = _probe_logp(model, cache)
    return _embed(logp - _base(model))


def _probe_logp(model, cache) -> torch.Tensor:
    """(P, vocab) float32 next-token log-probabilities at the end of each probe, after `cache`
    (a prefix every row shares) when given. Right padding: no real token attends a pad."""
    tok = model.tokenizer
    probes = [tok.encode(p, add_special_tokens=False) for p in PROBES]
    width = max(map(len, probes))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(probes), width), pad, dtype=torch.long)
    for i, p in enumerate(probes):
        ids[i, : len(p)] = torch.tensor(p)
    kwargs = {"use_cache": cache is not None}
    if cache is not None:
        kwargs.update(cache_kwargs(model.base.base_model, cache))
    hidden = model.base.base_model(input_ids=ids.to(model.device), **kwargs).last_hidden_state
    last = torch.tensor([len(p) - 1 for p in probes], device=hidden.device)
    h = hidden[torch.arange(len(probes), device=hidden.device), last]
    return torch.log_softmax(model.base.get_output_embeddings()(h).float(), dim=-1)


def _base(model) -> torch.Tensor:
    """The base's probe log-probabilities (P, vocab), computed once per model."""
    logp = _base_logp.get(model)
    if logp is None:
        with model.bind_states(None):
            logp = _probe_logp(model, None)
        _base_logp[model] = logp
    return logp


def _projection(vocab: int) -> torch.Tensor:
    """The fixed (vocab, PROJECTION_DIM) float32 Gaussian projection, N(0, 1/PROJECTION_DIM)."""
    if vocab not in _projections:
        g = torch.Generator().manual_seed(PROJECTION_SEED)
        _projections[vocab] = torch.randn(vocab, PROJECTION_DIM, generator=g) / PROJECTION_DIM**0.5
    return _projections[vocab]


def _embed(shift: torch.Tensor) -> torch.Tensor:
    """(P, vocab) log-probability shifts -> (P * PROJECTION_DIM,) float32 of norm 1 (see the
    module docstring)."""
    shift = shift - shift.mean(-1, keepdim=True)
    z = shift.cpu() @ _projection(shift.shape[-1])
    z = z * torch.rsqrt(z.pow(2).sum(-1, keepdim=True) + 1e-12)
    return (z / len(PROBES) ** 0.5).reshape(-1)


# -- lexical --------------------------------------------------------------------------------------


class LexicalBag:
    """Builds a lexical embedding from the base's reading of a text, batch by batch: `add` is
    called with what the base read (Library.add passes it as Binding.on_hidden, so the lexical
    embedding of a document comes from the same pass that absorbs it), `vector` gives the
    embedding. Each row is one window (chunk) read from its start."""

    def __init__(self, model):
        self.head = model.base.get_output_embeddings()
        self.bag = torch.zeros(vocab_size(model))

    @torch.no_grad()
    def add(self, ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor) -> None:
        """ids (b, t) long, mask (b, t) 1 for real tokens (right padding), hidden (b, t, d): the
        base's last hidden states. Each real token's surprisal -log p (nats) under the base is
        folded in by maximum; a window's first token gets the window's mean (1.0 for a window of
        one token, which has no prediction at all)."""
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            x = ids[row, :n]
            logits = self.head(hidden[row, : n - 1]).float()
            s = logits.logsumexp(-1) - logits.gather(-1, x[1:, None])[:, 0]  # -log p
            first = s.mean() if n > 1 else torch.ones((), device=s.device)
            self.bag.scatter_reduce_(0, x.cpu(), torch.cat([first[None], s]).cpu(), "amax")

    def vector(self) -> torch.Tensor:
        """(vocab,) float32 of norm 1. Raises DocumentError when nothing was added."""
        norm = self.bag.norm()
        if norm == 0:
            raise DocumentError("no text to embed")
        return self.bag / norm


@torch.no_grad()
def lexical(model, documents) -> torch.Tensor:
    """The lexical embedding of `documents` (a list of documents, each str, UTF-8 bytes or an
    iterable of pieces as Session.absorb takes; a question is a list of one str): (vocab,)
    float32 of norm 1, each token id's largest surprisal over all of them (module docstring).
    The base alone reads them (no state) in the model's chunks (chunk_tokens), one per forward,
    each after the model's encoding prefix, as absorbing reads a document, so a question and a
    stored document are embedded alike.

    Raises DocumentError for an empty or non-text document."""
    bag = LexicalBag(model)
    prefix = model.encoding_prefix
    p = len(prefix)
    with model.bind_states(None):
        for document in documents:
            for chunk in model.chunks(document):
                ids = torch.tensor([prefix + chunk], device=model.device)
                hidden = model.base.base_model(input_ids=ids, use_cache=False).last_hidden_state
                bag.add(ids[:, p:], torch.ones_like(ids[:, p:]), hidden[:, p:])
    return bag.vector()
