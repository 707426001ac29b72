"""Gates of a library's documents for per-token routing (routing.py, PHATGOOSE: Muqeeth et al.,
ICML 2024, arXiv 2402.05859), each made from one document alone.

Kinds (Library.routes(k, gates=...)):
    "closed":  the document's mean layer input g (folder.py stores it at add time), scored
               against each token's layer input x as <std(x), std(g)> / sqrt(d_in).
    "centred": the same means with a fixed background m subtracted from both sides first:
               <std(x - m), std(g - m)> / sqrt(d_in). m is, per adapted layer, the base's mean
               input over BACKGROUND_TEXT, a fixed generic text: it depends on the base alone
               (recomputed deterministically and cached per model), never on the library, and
               removes the direction every text shares, which otherwise dominates the score.
    "trained": PHATGOOSE's gate: with the document's delta frozen, a vector v per layer is
               trained on the document's own tokens so that the layer computes
               W x + sigmoid(<v, x>) B (D x), minimizing the next-token loss (train_gates);
               routed as "closed" with v in place of g. Made on demand, not at add time.

Measured with the v0 generator on held-out corpus documents (docs/LIBRARY.md, "Embeddings,
gates and routing"):
"closed" recovers 96.8% of the oracle's perplexity gain at N = 32 (k = 2), "centred" 96.4%;
"trained" (10 steps, 72 s per document on a shared 2-core CPU) 93.0% against "closed"'s 95.9%
at N = 8. So the library routes with "closed" by default, offers "centred", and does not store
trained gates.
"""

from __future__ import annotations

import weakref

import torch

from ..layers import AdaptedLinear
from .embedding import input_means

# A fixed, generic text whose mean layer inputs are the background of "centred" gates: varied
# registers (narrative, instructions, reference, dialogue, code, numbers) so that no one topic
# dominates. Changing it changes every centred score.
BACKGROUND_TEXT = """\
The morning was cold, and the road into town was still wet from the night's rain. She bought
bread, read the notices on the board outside the hall, and walked home along the river.
To install the package, open a terminal and run the command shown below. If the installer asks
for a password, enter the one you use to log in. Restart the program when it has finished.
The committee met on Tuesday to discuss the budget for the coming year. Most members agreed that
the library and the school needed more money, but nobody could say where it would come from.
"Are you coming tonight?" he asked. "I don't know yet," she said. "It depends on the weather."
Water boils at one hundred degrees Celsius at sea level. The human heart has four chambers, and
the Earth turns once on its axis in a little under twenty-four hours.
def total(items):
    return sum(item.price * item.count for item in items)
In 1848 a wave of revolutions spread across Europe. Prices rose, harvests failed, and in many
cities people demanded a constitution, a free press and the right to vote.
Definition: a noun is a word that names a person, place, thing or idea. See also: verb, adjective.
Section 3. The tenant shall pay the rent on the first day of each month and keep the property in
good repair. Either party may end this agreement with thirty days' notice in writing.
Mix two cups of flour with a pinch of salt, add the butter, and knead until the dough is smooth.
"""

_backgrounds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def background(model) -> dict[str, torch.Tensor]:
    """Per adapted layer, the base's mean input (d_in,) float32 over BACKGROUND_TEXT; computed
    once per model (one context pass of about 300 tokens)."""
    means = _backgrounds.get(model)
    if means is None:
        means = _backgrounds[model] = input_means(model, BACKGROUND_TEXT)
    return means


def train_gates(
    model, state, text: str, steps: int = 10, lr: float = 1e-2, max_tokens: int = 512
) -> dict[str, torch.Tensor]:
    """PHATGOOSE's gates for one document: per adapted layer a vector v (d_in,) float32, trained
    with Adam from v = 0 for `steps` full-batch steps on the document's own first `max_tokens`
    tokens (`text`), the model computing W x + sigmoid(<v, x>) B (D x) at every adapted layer
    (D = the state's folded delta, frozen, as is everything but v) and the loss being the mean
    next-token cross-entropy. Deterministic for given inputs. Raises ValueError for a text of
    fewer than two tokens."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    if len(ids) < 2:
        raise ValueError("training a gate needs a text of at least two tokens")
    x = torch.tensor([ids], device=model.device)
    folded = model.generator.folded(state)
    layers = {m.name: m for m in model.base.modules() if isinstance(m, AdaptedLinear)}
    gates = {
        n: torch.zeros(d_in, device=model.device, requires_grad=True)
        for n, (d_in, _) in model.generator.shapes.items()
    }

    def hook(module, inputs, output):
        h = inputs[0].float()
        z = torch.nn.functional.linear(h, folded[module.name])  # (b, t, r2)
        z = z * torch.sigmoid(h @ gates[module.name]).unsqueeze(-1)
        return output + (z @ module.adapter.B.T).to(output.dtype)

    handles = [layers[n].register_forward_hook(hook) for n in gates]
    optimizer = torch.optim.Adam(gates.values(), lr=lr)
    try:
        with model.bind_states(None), torch.enable_grad():
            for _ in range(steps):
                logits = model.base(input_ids=x, use_cache=False).logits[0, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits, x[0, 1:])
                optimizer.zero_grad()
                loss.backward(inputs=list(gates.values()))
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    return {n: v.detach() for n, v in gates.items()}
