"""The SFT baseline of the paper: a LoRA fine-tuned by gradient descent on the language-modelling
loss of the context, for a fixed number of steps, on a copy of the frozen base. It answers through
an AdaptedModel of its own with an empty session, so template and decoding are the runner's."""

from __future__ import annotations

import copy
import time

import torch

from ..base import Base
from ..generator import Generator, GeneratorConfig
from ..layers import AdaptedLinear
from ..model import AdaptedModel

# The adapted layers keep the generator's wrappers (o_proj, down_proj): LoRA goes on the others.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]


class SFTBaseline:
    def __init__(
        self,
        model: AdaptedModel,
        steps: int,
        lr: float = 1e-3,
        rank: int = 8,
        chunk_tokens: int = 512,
        seed: int = 0,
    ):
        from peft import LoraConfig, inject_adapter_in_model

        if steps < 1:
            raise ValueError("SFT needs at least one step")
        self.steps, self.lr, self.chunk_tokens = steps, lr, chunk_tokens
        base = copy.deepcopy(model.base)
        for name, module in list(base.named_modules()):
            if isinstance(module, AdaptedLinear):  # back to the plain transformers model
                parent, _, child = name.rpartition(".")
                setattr(base.get_submodule(parent), child, module.base)
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS
        )
        inject_adapter_in_model(config, base)
        self.lora = {n: p for n, p in base.named_parameters() if "lora_" in n}
        self.initial = {n: p.detach().clone() for n, p in self.lora.items()}
        # A zero-B generator: every session of this model is exactly the fine-tuned copy.
        generator = Generator.for_base(
            base, GeneratorConfig(targets=model.generator.config.targets)
        )
        self.model = AdaptedModel(
            Base(base, model.tokenizer, model.base_name, model.base_fingerprint), generator
        )
        self.model.base.requires_grad_(False)

    def fit(self, context: str) -> float:
        """Fresh LoRA, then `steps` AdamW steps on the context's chunks in turn; returns seconds."""
        start = time.perf_counter()
        with torch.no_grad():
            for n, p in self.lora.items():
                p.copy_(self.initial[n])
        ids = self.model.tokenizer.encode(context, add_special_tokens=False)
        if len(ids) < 2:
            raise ValueError("SFT needs a context of at least two tokens")
        chunks = [ids[i : i + self.chunk_tokens] for i in range(0, len(ids), self.chunk_tokens)]
        chunks = [c for c in chunks if len(c) > 1]
        params = list(self.lora.values())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        with torch.enable_grad():
            for step in range(self.steps):
                x = torch.tensor([chunks[step % len(chunks)]], device=self.model.device)
                loss = self.model.base(input_ids=x, labels=x, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)
        return time.perf_counter() - start
