"""Training throughput: generator training tokens/s against the base model's own
forward+backward tokens/s on the same tokens, measured side by side in one process.

    python training/probes/throughput.py [--context 512] [--target 256] [--reps 5] \
        [--dtype bfloat16]

A generator step encodes the context without the base's graph and backpropagates through the base
over the target only; a base forward+backward (what fine-tuning would cost) runs over context and
target together with every base weight trainable. Both are timed on identical token counts,
alternating, and the ratio of their tokens/s is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent  # training/probes: the probes, then the recipe
sys.path[:0] = [str(HERE), str(HERE.parent)]
from passes import Sample, adapter_loss  # noqa: E402

from genadapter.base import load_base  # noqa: E402
from genadapter.generator import Generator  # noqa: E402
from genadapter.model import AdaptedModel  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--target", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    args = p.parse_args()

    base = load_base(None, device=args.device, dtype=args.dtype)
    model = AdaptedModel(base, Generator.for_base(base.model).randomize_(0))
    model.generator.train().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, len(model.tokenizer), (args.context + args.target,), generator=g)
    sample = Sample(
        "completion",
        tokens[: args.context].tolist(),
        tokens[args.context :].tolist(),
        tokens[args.context :].tolist(),
    )
    ids = tokens.unsqueeze(0).to(model.device)
    autocast = torch.autocast(
        model.device.type, dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32"
    )

    def generator_step():
        with autocast:
            adapter_loss(model, [sample]).backward()
        model.generator.zero_grad(set_to_none=True)

    def base_step():
        base.model.requires_grad_(True)
        with autocast:
            base.model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        base.model.zero_grad(set_to_none=True)
        base.model.requires_grad_(False)

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    times = {"generator": [], "base_fwd_bwd": []}
    generator_step(), base_step()  # warm-up
    for _ in range(args.reps):
        for name, fn in (("generator", generator_step), ("base_fwd_bwd", base_step)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    n = args.context + args.target
    best = {k: min(v) for k, v in times.items()}
    result = {
        "device": device_name(model.device),
        "dtype": args.dtype,
        "context_tokens": args.context,
        "target_tokens": args.target,
        "generator_tokens_per_s": n / best["generator"],
        "base_fwd_bwd_tokens_per_s": n / best["base_fwd_bwd"],
        "ratio": best["base_fwd_bwd"] / best["generator"],
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
