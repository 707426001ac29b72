"""Gates for routing (genadapter/library/gates.py): the fixed background of centred gates and
PHATGOOSE's trained sigmoid gates, on the default base with a random generator."""

import torch

from genadapter.library import gates

from .conftest import DOCUMENT


def test_background_is_fixed_and_trained_gates_are_deterministic(random_model):
    first = gates.background(random_model)
    assert set(first) == set(random_model.generator.shapes)
    assert gates.background(random_model) is first  # computed once per model
    for name, (d_in, _) in random_model.generator.shapes.items():
        assert first[name].shape == (d_in,) and torch.isfinite(first[name]).all()
    state = random_model.encode(DOCUMENT[:300])[0]
    text = DOCUMENT[:200]
    ids = torch.tensor([random_model.tokenizer.encode(text, add_special_tokens=False)])
    before = random_model.logits(ids)
    trained = gates.train_gates(random_model, state, text, steps=1, max_tokens=16)
    again = gates.train_gates(random_model, state, text, steps=1, max_tokens=16)
    for name, (d_in, _) in random_model.generator.shapes.items():
        assert trained[name].shape == (d_in,) and not trained[name].requires_grad
        assert torch.equal(trained[name], again[name])
    assert any(v.abs().max() > 0 for v in trained.values())  # moved away from v = 0
    # The hooks are gone: the model answers as before.
    assert torch.equal(random_model.logits(ids), before)
