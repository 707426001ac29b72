"""Per-token decode latency of one adapted layer on a GPU: the bare NF4 base (bitsandbytes), the
base with genadapter's fused adapter (one NF4 pass + the delta, each sequence its own S_hat), the
base with genadapter's delta unfused (bitsandbytes matmul + delta kernels), and the base with a
PEFT LoRA of the same rank on bitsandbytes 4-bit (one adapter shared by the whole batch).

Layers shaped like Mistral-7B's o_proj (4096 -> 4096) and down_proj (14336 -> 4096), random
bfloat16 weights quantized to NF4 (blocksize 64, double quantization); batches of 1 to 64
sequences, one token each. Latency is the median of CUDA-event timings of eager calls (what the
model runs, Python dispatch included). Achieved bandwidth counts the bytes the bare layer must
read (packed weight, absmax codes, activations) and is compared with a device-to-device copy
measured on the same card. Writes JSON and a Markdown table.

    .venv/bin/python benchmarks/gpu_decode.py --out benchmarks/results/gpu_decode

Needs a CUDA GPU, bitsandbytes and peft; genadapter's kernels are built by setup.py or at first
use (JIT). Without a GPU it stops with a message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from genadapter import kernels
from genadapter.generator import LayerAdapter
from genadapter.layers import AdaptedLinear, Binding, bound

LAYERS = {"o_proj": (4096, 4096), "down_proj": (14336, 4096)}  # name -> (d_in, d_out)
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def requirements() -> str | None:
    """Why this benchmark cannot run here, or None."""
    if not torch.cuda.is_available():
        return "gpu_decode.py needs a CUDA GPU; none is visible to torch on this machine."
    for package in ("bitsandbytes", "peft"):
        try:
            __import__(package)
        except ImportError as e:
            return f"gpu_decode.py needs {package} (pip install {package}): {e}"
    return None


def time_call(fn, iters: int, warmup: int) -> float:
    """Median seconds per call, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), iters=20, warmup=3)
    return 2 * src.numel() / seconds


class OneLayer(nn.Module):
    """A module PEFT can target."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def measure_batch(name, base, fused, lora, weight, adapter, x, s_hat, args) -> dict[str, float]:
    """Seconds per call of each variant on one batch, after checking the fused output."""

    def run_fused():
        with bound(fused.binding, s_hat={name: s_hat}):
            return fused(x)

    def run_unfused():
        y = base(x)
        return y + kernels.lowrank_delta(x, adapter.A, adapter.B, s_hat, 1.0).to(y.dtype)

    with torch.no_grad():
        # Time only correct kernels: the fused output against the float32 reference.
        expect = kernels.nf4_lowrank_linear_reference(
            x, weight, None, adapter.A, adapter.B, s_hat, 1.0
        ).float()
        err = (run_fused().float() - expect).abs().max() / expect.abs().max()
        if err > 2**-6:
            raise AssertionError(f"{name} batch {x.shape[0]}: fused output off by {err:.3g}")
        return {
            "bare_nf4": time_call(lambda: base(x), args.iters, args.warmup),
            "fused_adapter": time_call(run_fused, args.iters, args.warmup),
            "unfused_adapter": time_call(run_unfused, args.iters, args.warmup),
            "peft_lora": time_call(lambda: lora(x), args.iters, args.warmup),
        }


def bench_layer(name: str, d_in: int, d_out: int, args, copy_bps: float) -> list[dict]:
    import peft

    from genadapter.quantize import quantize_linear

    dev = torch.device("cuda")
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out, bias=False, device=dev, dtype=torch.bfloat16)
    base = quantize_linear(linear, "nf4")
    del linear
    weight = kernels.NF4Weight.from_module(base)
    g = torch.Generator().manual_seed(1)
    adapter = LayerAdapter(d_in, d_out, args.rank, args.rank, alpha=1.0, g=g)
    with torch.no_grad():
        adapter.B.normal_(0, args.rank**-0.5, generator=g)
    adapter = adapter.to(dev).requires_grad_(False)
    fused = AdaptedLinear(name, base, adapter, Binding())
    lora = peft.get_peft_model(
        OneLayer(
            quantize_linear(
                nn.Linear(d_in, d_out, bias=False, device=dev, dtype=torch.bfloat16), "nf4"
            )
        ),
        peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["proj"]),
    ).eval()
    peft_layer = type(lora.base_model.model.proj)  # PEFT's bitsandbytes 4-bit LoRA layer on CUDA
    weight_bytes = weight.packed.numel() + weight.absmax.numel() * weight.absmax.element_size()

    rows = []
    for batch in tqdm(args.batches, desc=name, leave=False):
        x = torch.randn(batch, 1, d_in, device=dev, dtype=torch.bfloat16)
        s_hat = torch.randn(batch, args.rank, args.rank, device=dev)

        timings = measure_batch(name, base, fused, lora, weight, adapter, x, s_hat, args)
        moved = weight_bytes + 2 * batch * (d_in + d_out)  # weight + bf16 activations in/out
        rows.append(
            {
                "layer": name,
                "d_in": d_in,
                "d_out": d_out,
                "batch": batch,
                "rank": args.rank,
                "peft_layer": f"{peft_layer.__module__}.{peft_layer.__name__}",
                **{f"{k}_us": v * 1e6 for k, v in timings.items()},
                "fused_overhead": timings["fused_adapter"] / timings["bare_nf4"] - 1,
                "peft_overhead": timings["peft_lora"] / timings["bare_nf4"] - 1,
                "bare_bandwidth_fraction": moved / timings["bare_nf4"] / copy_bps,
                "fused_bandwidth_fraction": moved / timings["fused_adapter"] / copy_bps,
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}; kernels backend {meta['backend']}; "
        f"rank {meta['rank']}; copy bandwidth {meta['copy_gbps']:.0f} GB/s.",
        "",
        "| layer | batch | bare nf4 us | fused adapter us | overhead | unfused us | "
        "PEFT LoRA us | PEFT overhead | bare BW / copy | fused BW / copy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['batch']} | {r['bare_nf4_us']:.1f} | "
            f"{r['fused_adapter_us']:.1f} | {100 * r['fused_overhead']:+.1f}% | "
            f"{r['unfused_adapter_us']:.1f} | {r['peft_lora_us']:.1f} | "
            f"{100 * r['peft_overhead']:+.1f}% | {r['bare_bandwidth_fraction']:.2f} | "
            f"{r['fused_bandwidth_fraction']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32, help="r1 = r2 of the adapter, LoRA rank")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default="gpu_decode", help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    problem = requirements()
    if problem:
        print(problem, file=sys.stderr)
        return 2

    start = time.perf_counter()
    backend = kernels.backend()  # builds the kernels (JIT) if setup.py did not
    if backend == "reference":
        print("genadapter's CUDA kernels did not build; see the log above.", file=sys.stderr)
        return 2
    copy_bps = copy_bandwidth()
    rows = []
    for name in args.layers:
        rows += bench_layer(name, *LAYERS[name], args, copy_bps)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "backend": backend,
        "rank": args.rank,
        "copy_gbps": copy_bps / 1e9,
        "seconds": time.perf_counter() - start,
        "command": " ".join(sys.argv),
    }
    table = markdown(rows, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
