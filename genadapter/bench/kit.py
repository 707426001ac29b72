"""What every `genadapter bench` part shares (run.py, library.py, memory.py): a clock that waits
for the device, generated prose to measure on, greedy decoding timed token by token, KV-cache
bytes and cropping, and the machine's description. Imports no other bench module, so the parts
import it one way."""

from __future__ import annotations

import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from ..generation import cache_kwargs
from ..model import AdaptedModel
from ..state import AdapterState


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(model: AdaptedModel) -> float:
    """time.perf_counter() in seconds, once the model's device has finished its work."""
    sync(model.device)
    return time.perf_counter()


def bench_text(model: AdaptedModel, tokens: int, seed: int = 0) -> list[int]:
    """`tokens` token ids of generated English prose (documents about invented entities)."""
    from ..eval.fictional import NameMaker, entity_document

    rng = random.Random(f"bench:{seed}")
    names = NameMaker(rng)
    documents, chars = [], 0
    while chars < 6 * tokens:  # English prose: about 4 to 5 characters per token
        documents.append(entity_document(names, rng)[0])
        chars += len(documents[-1])
    ids = model.tokenizer.encode("\n\n".join(documents), add_special_tokens=False)
    if len(ids) < tokens:
        raise RuntimeError("generated too little text for the benchmark")
    return ids[:tokens]


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes held by a KV cache's key and value tensors."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )


def crop(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of a cache."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@dataclass
class Timing:
    ttft: float  # seconds to the first token
    per_token: float  # seconds per later token
    tokens: list[int]
    cache: DynamicCache


@torch.no_grad()
def timed_greedy(
    model: AdaptedModel,
    ids: list[int],
    state: AdapterState | None,
    new_tokens: int,
    cache: DynamicCache | None = None,
) -> Timing:
    """Greedy decoding of exactly new_tokens tokens (end of sequence ignored) after `ids`, which
    continue `cache` when given."""
    cache = cache if cache is not None else DynamicCache()
    x = torch.tensor([ids], device=model.device)
    tokens = []
    with model.bind_states([state]):
        start = clock(model)
        token = (
            model.base(input_ids=x, **cache_kwargs(model.base, cache), use_cache=True)
            .logits[0, -1]
            .argmax()
        )
        first = clock(model)
        for _ in range(new_tokens - 1):
            tokens.append(token)
            out = model.base(
                input_ids=token.view(1, 1), **cache_kwargs(model.base, cache), use_cache=True
            )
            token = out.logits[0, -1].argmax()
        end = clock(model)
    tokens = [int(t) for t in [*tokens, token]]
    return Timing(first - start, (end - first) / max(new_tokens - 1, 1), tokens, cache)


def machine() -> dict:
    """The CPU's model name, CPU count, torch threads, versions and the GPU if any."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def header(model) -> dict:
    """The fields every bench result starts with: the machine, device, dtype, base, generator."""
    return {
        "machine": machine(),
        "device": str(model.device),
        "dtype": str(model.base.dtype).removeprefix("torch."),
        "base": model.base_name,
        "generator": model.generator_fingerprint,
    }


def part_report(r: dict, key: str, lines: list[str]) -> str:
    """The report of one part run alone (`genadapter bench --KEY`): a header line, then `lines`."""
    head = (
        f"genadapter bench --{key} on {r['device']} ({r['machine']['cpu']}, {r['dtype']}), "
        f"{r[key]['seconds']:.0f} s"
    )
    return "\n".join([head, "", *lines])
