"""Quantize the frozen base with bitsandbytes: every linear layer of the decoder stack becomes an
NF4 layer (4-bit NormalFloat codes, one absmax per block of 64 weights, the absmaxes themselves
8-bit quantized: QLoRA's double quantization) or an LLM.int8() layer (8-bit rows, outlier input
columns in 16 bits; its matmul takes float16 inputs whatever the base's dtype). Embeddings and the
LM head keep the base's dtype, so the base fingerprint (taken from the embeddings) is the same
quantized or not, and saved generators and sessions still fit.

Run this before the generator is injected: the adapted layers then wrap the quantized modules and
add their low-rank delta on top of the quantized matmul."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("nf4", "int8")
NF4_BLOCKSIZE = 64
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s default: activations above it take the 16-bit path


def check_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in QUANTIZE_MODES:
        known = ", ".join(QUANTIZE_MODES)
        raise ValueError(f"quantize must be one of {known} or None, not {mode!r}")
    return mode


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes logs a warning on every int8 matmul whose input is not float16; casting is
    how LLM.int8() works and is documented here, so one notice per forward is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as e:  # a dependency, but its native library can fail to load
        raise RuntimeError(f"quantized bases need bitsandbytes, which failed to import: {e}") from e
    int8_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in int8_logger.filters):
        int8_logger.addFilter(_DropInt8CastNotice())
    return bitsandbytes


def quantize_linear(linear: nn.Linear, mode: str) -> nn.Module:
    """A bitsandbytes module with `linear`'s weights, on `linear`'s device; computes in the
    weight's dtype."""
    bnb = _bitsandbytes()
    weight = linear.weight.detach()
    bias = linear.bias is not None
    if mode == "nf4":
        packed, state = bnb.functional.quantize_4bit(
            weight.contiguous(),
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=True,
            quant_type="nf4",
        )
        module = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=weight.dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        module.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=True,
            quant_type="nf4",
            bnb_quantized=True,
            module=module,
        )
        module.quant_state = state
    elif mode == "int8":
        rows, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        module = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=INT8_OUTLIER_THRESHOLD,
            device="meta",
        )
        module.weight = bnb.nn.Int8Params(
            rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=scales
        )
    else:
        raise ValueError(f"unknown quantization {mode!r}; known: {', '.join(QUANTIZE_MODES)}")
    if bias:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module.eval().requires_grad_(False)


@torch.no_grad()
def quantize_base(model: nn.Module, mode: str) -> int:
    """Replace the decoder stack's nn.Linear layers of a transformers causal LM in place; returns
    how many were replaced. The LM head (outside `model.base_model`) is left as it is."""
    check_mode(mode)
    decoder = model.base_model
    targets = [(n, m) for n, m in decoder.named_modules() if type(m) is nn.Linear]
    if mode == "nf4":
        # bitsandbytes' CPU kernels assume whole absmax blocks per row; such layers are rare
        # (hidden sizes are multiples of 64) and stay in full precision.
        odd = [n for n, m in targets if m.in_features % NF4_BLOCKSIZE]
        if odd:
            log.warning(
                "%d layers with inputs not a multiple of %d stay unquantized: %s",
                len(odd),
                NF4_BLOCKSIZE,
                ", ".join(odd[:3]),
            )
            targets = [(n, m) for n, m in targets if n not in odd]
    if not targets:
        raise ValueError("the base model has no plain linear layers to quantize")
    before = _linear_bytes(targets)
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = decoder.get_submodule(parent_name) if parent_name else decoder
        setattr(parent, child, quantize_linear(linear, mode))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info(
        "Quantized %d linear layers to %s (%.1f MiB of weights before)",
        len(targets),
        mode,
        before / 2**20,
    )
    return len(targets)


def _linear_bytes(targets: list[tuple[str, nn.Linear]]) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for _, m in targets)
