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
    # Held-out FOLDOC documents (the "test" split, never trained on): absorb 512 tokens, score
    # the next 256 with and without the session. The generator was trained on this kind of text;
    # on narrative prose of another domain it does not help yet (docs/TRAINING.md).
    from genadapter import corpora

    if "foldoc" not in corpora.available():
        pytest.skip("needs Debian's dict-foldoc (apt-get install dict-foldoc)")
    tok = trained.tokenizer
    docs = [tok.encode(t, add_special_tokens=False) for _, t in corpora.documents("foldoc", "test")]
    docs = [d for d in docs if len(d) >= 800][:2]
    for ids in docs:
        s = trained.session()
        s.absorb(tok.decode(ids[:512]))
        target = tok.decode(ids[512:768])
        base, adapted = trained.score(target), trained.score(target, session=s)
        assert adapted < base - 0.2, (base, adapted)
