"""The trained generator checkpoint in training/checkpoints/ on the real default base."""

from pathlib import Path

import pytest
import torch

import genadapter

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "training" / "checkpoints" / "smollm2-135m-v0"


@pytest.fixture(scope="module")
def trained(reference):
    return genadapter.load(generator=CHECKPOINT, device="cpu", dtype=torch.float32)


def test_empty_session_with_trained_generator_equals_base(trained, reference):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(trained.tokenizer), (2, 32), generator=g)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    got = trained.logits(ids, [trained.session().state] * 2)
    assert (got - expected).abs().max().item() <= 1e-5


def test_absorbed_text_lowers_perplexity_of_its_continuation(trained):
    # Held-out dictionary documents (the "test" split of the fixture FOLDOC of
    # tests/corpus_fixture.py, laid out like the real one the generator was trained on): absorb 512
    # tokens, score the next 256 with and without the session. On narrative prose of another
    # domain the generator does not help yet (docs/TRAINING.md).
    from genadapter.eval import corpora

    tok = trained.tokenizer
    docs = [tok.encode(t, add_special_tokens=False) for _, t in corpora.documents("foldoc", "test")]
    docs = [d for d in docs if len(d) >= 800][:2]
    assert len(docs) == 2
    gains = []
    for ids in docs:
        s = trained.session()
        s.absorb(tok.decode(ids[:512]))
        target = tok.decode(ids[512:768])
        gains.append(trained.score(target) - trained.score(target, session=s))
    assert min(gains) > 0.15 and sum(gains) / len(gains) > 0.2, gains
