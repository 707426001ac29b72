"""The adapter's hot operations, one function each, with the pure-PyTorch reference beside it.

    lowrank_delta       alpha * B (S_hat^T (A x)), each sequence with its own S_hat
    nf4_lowrank_linear  dequant(W) x + bias + that delta, W in bitsandbytes' NF4 layout (decode)
    kv_sums             sum_t k_t v_t^T per sequence, k/v from RMSNorm(x) (context pass)

Each dispatches to the CUDA kernels of `cuda_ext/` when the inputs are on a GPU, no gradient is
needed and the extension is available, and to the reference otherwise; `backend()` says which
extension is in use: "cuda_ext" (built by setup.py), "jit" (built here at first use) or
"reference". GENADAPTER_KERNELS=reference forces the reference.

The NF4 layout (read from bitsandbytes' documentation and source, reimplemented here): a
row-major (rows x cols) weight is cut into blocks of `blocksize` consecutive elements; element e
is the 4-bit code in byte e // 2 (high nibble when e is even) and decodes to
NF4_LEVELS[code] * absmax[e // blocksize]. With double quantization the absmaxes are themselves
stored as 8-bit codes: absmax[b] = nested_code[codes[b]] * nested_absmax[b // nested_blocksize]
+ nested_offset.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023): quantiles of a standard normal
# rescaled to [-1, 1], with an exact zero; the same values are in cuda_ext/nf4_decode.cu.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
DECODE_MAX_TOKENS = 64  # above this many tokens per forward, the base runs its own matmul
MAX_RANK = 1024  # r2 the kernels keep in shared memory (cuda_ext/launch.h kMaxRank)
SOURCES = Path(__file__).resolve().parent.parent / "cuda_ext"  # in a source checkout
_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- the NF4 layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NF4Weight:
    """A (rows x cols) weight in bitsandbytes' NF4 layout; tensors are read, never copied."""

    packed: torch.Tensor  # uint8, (rows * cols + 1) // 2 bytes
    absmax: torch.Tensor  # per block: float32, or uint8 codes when nested_code is set
    shape: tuple[int, int]
    blocksize: int = 64
    nested_code: torch.Tensor | None = None  # float32 (256,)
    nested_absmax: torch.Tensor | None = None  # float32, one per nested_blocksize blocks
    nested_offset: torch.Tensor | None = None  # float32 scalar
    nested_blocksize: int = 256

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, state) -> NF4Weight:
        """From bitsandbytes' quantize_4bit output (its packed tensor and QuantState)."""
        if state.quant_type != "nf4" or len(state.shape) != 2:
            raise ValueError(f"not a 2-D NF4 weight: {state.quant_type} {tuple(state.shape)}")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("this weight was repacked for bitsandbytes' CPU kernel")
        nested = state.nested
        return cls(
            packed=packed.view(torch.uint8).reshape(-1),
            absmax=state.absmax.reshape(-1),
            shape=(int(state.shape[0]), int(state.shape[1])),
            blocksize=int(state.blocksize),
            nested_code=state.state2.code.float() if nested else None,
            nested_absmax=state.state2.absmax.float() if nested else None,
            nested_offset=state.offset.float().reshape(()) if nested else None,
            nested_blocksize=int(state.state2.blocksize) if nested else 256,
        )

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> NF4Weight | None:
        """The layout of a bitsandbytes Linear4bit holding an NF4 weight, or None."""
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or getattr(state, "quant_type", None) != "nf4":
            return None
        if getattr(state, "packing_format_for_cpu", False):
            return None
        return cls.from_quant_state(module.weight.data, state)


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """float32 absmax of every block."""
    if w.nested_code is None:
        return w.absmax.float()
    outer = w.nested_absmax.repeat_interleave(w.nested_blocksize)[: w.absmax.numel()]
    return w.nested_code[w.absmax.long()] * outer + w.nested_offset


def dequantize_nf4(w: NF4Weight) -> torch.Tensor:
    """The float32 (rows x cols) weight."""
    rows, cols = w.shape
    n = rows * cols
    codes = torch.stack([w.packed >> 4, w.packed & 0xF], dim=1).reshape(-1)[:n].long()
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=w.packed.device)
    scale = block_absmax(w).repeat_interleave(w.blocksize)[:n]
    return (levels[codes] * scale).reshape(rows, cols)


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, nested: bool = True, nested_blocksize: int = 256
) -> NF4Weight:
    """Quantize to the NF4 layout without bitsandbytes (for tests and benchmarks on machines
    without it): nearest level per element; with `nested`, absmaxes minus their mean as 8-bit
    codes on a uniform grid over [-1, 1] scaled by each nested block's absmax. bitsandbytes uses
    another 8-bit grid; the layout, and so every reader of it, is the same."""
    if weight.dim() != 2:
        raise ValueError("quantize_nf4 takes a 2-D weight")
    rows, cols = weight.shape
    flat = weight.detach().float().reshape(-1)
    pad = -flat.numel() % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(1)
    levels = torch.tensor(NF4_LEVELS, device=flat.device)
    scaled = (blocks / absmax.clamp_min(1e-12)[:, None]).reshape(-1)[: flat.numel()]
    codes = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_LEVELS.index(0.0))])  # as bnb pads
    packed = (codes[0::2] << 4) | codes[1::2]
    if not nested:
        return NF4Weight(packed, absmax, (rows, cols), blocksize)
    offset = absmax.mean()
    centered = absmax - offset
    outer_pad = -centered.numel() % nested_blocksize
    outer_blocks = torch.nn.functional.pad(centered, (0, outer_pad)).reshape(-1, nested_blocksize)
    outer = outer_blocks.abs().amax(1).clamp_min(1e-12)
    grid = torch.linspace(-1.0, 1.0, 256, device=flat.device)
    inner = (outer_blocks / outer[:, None]).reshape(-1)[: centered.numel()]
    absmax_codes = torch.bucketize(inner, (grid[1:] + grid[:-1]) / 2).to(torch.uint8)
    return NF4Weight(
        packed, absmax_codes, (rows, cols), blocksize, grid, outer, offset, nested_blocksize
    )


# -- references -------------------------------------------------------------------------------


def lowrank_delta_reference(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s_hat: torch.Tensor, alpha: float
) -> torch.Tensor:
    """float32 alpha * B (S_hat^T (A x)): x (b, t, d_in), s_hat (b, r1, r2)."""
    z = (x.float() @ A.T) @ s_hat
    return alpha * (z @ B.T)


def nf4_lowrank_linear_reference(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    s_hat: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """dequant(W) x + bias + alpha * B (S_hat^T (A x)) in float32, returned in x's dtype."""
    y = x.float() @ dequantize_nf4(weight).T
    if bias is not None:
        y = y + bias.float()
    return (y + lowrank_delta_reference(x, A, B, s_hat, alpha)).to(x.dtype)


def kv_sums_reference(
    x: torch.Tensor,
    norm: torch.Tensor,
    Wk: torch.Tensor,
    Wv: torch.Tensor,
    token_mask: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Per sequence, sum over its tokens of k v^T: (b, t, d_in) -> (b, r1, r2), float32 (also
    under an autocast)."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm
        k, v = h @ Wk.T, h @ Wv.T
        if token_mask is not None:
            k = k * token_mask.unsqueeze(-1).to(k.dtype)
        return k.mT @ v


# -- dispatch ---------------------------------------------------------------------------------


def backend() -> str:
    """ "cuda_ext", "jit" or "reference": where the operations run for CUDA inputs."""
    return _extension()[1]


def lowrank_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    s_hat: torch.Tensor,
    alpha: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha * B (S_hat^T (A x)) per sequence. The reference returns float32; the kernel returns
    x's dtype (accumulating in float32), which the caller casts to anyway. `out` (x's dtype),
    when given, receives it."""
    ext = _kernel_for(x, A, B, s_hat)
    if ext is None or _sequences(x, s_hat, B.shape[1]) is None:
        y = lowrank_delta_reference(x, A, B, s_hat, alpha)
        return y if out is None else out.copy_(y)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    if out is None:
        out = torch.empty(*x.shape[:-1], B.shape[0], dtype=x.dtype, device=x.device)
    ext.lowrank_delta(x2d, _f32(A), _f32(B), _f32(s_hat), float(alpha), out.view(-1, B.shape[0]))
    return out


def nf4_lowrank_linear(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    s_hat: torch.Tensor,
    alpha: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """dequant(W) x + bias + alpha * B (S_hat^T (A x)) in x's dtype, reading W's NF4 layout in
    place (decode: a few tokens for each of many sequences). `out`, when given, receives it."""
    ext = _kernel_for(x, A, B, s_hat)
    rows, cols = weight.shape
    if (
        ext is None
        or _sequences(x, s_hat, B.shape[1]) is None
        or x.shape[-1] != cols
        or weight.blocksize % 8
    ):
        y = nf4_lowrank_linear_reference(x, weight, bias, A, B, s_hat, alpha)
        return y if out is None else out.copy_(y)
    x2d = x.reshape(-1, cols).contiguous()
    if out is None:
        out = torch.empty(*x.shape[:-1], rows, dtype=x.dtype, device=x.device)
    ext.nf4_lowrank_linear(
        x2d,
        weight.packed,
        weight.absmax,
        weight.nested_code,
        weight.nested_absmax,
        weight.nested_offset,
        weight.blocksize,
        weight.nested_blocksize,
        rows,
        None if bias is None else bias.to(x.dtype).contiguous(),
        _f32(A),
        _f32(B),
        _f32(s_hat),
        float(alpha),
        out.view(-1, rows),
    )
    return out


def kv_sums(
    x: torch.Tensor,
    norm: torch.Tensor,
    Wk: torch.Tensor,
    Wv: torch.Tensor,
    token_mask: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per sequence, sum over its unmasked tokens of k v^T, k = RMSNorm(x) Wk^T and
    v = RMSNorm(x) Wv^T: (b, t, d_in) -> (b, r1, r2), float32 (into `out` when given)."""
    ext = _kernel_for(x, norm, Wk, Wv)
    if ext is None or x.dim() != 3:
        s = kv_sums_reference(x, norm, Wk, Wv, token_mask, eps)
        return s if out is None else out.copy_(s)
    if out is None:
        out = torch.empty(x.shape[0], Wk.shape[0], Wv.shape[0], device=x.device)
    ext.kv_sums(x.contiguous(), _f32(norm), _f32(Wk), _f32(Wv), token_mask, float(eps), out)
    return out


_fused_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused_nf4_weight(
    module: torch.nn.Module, x: torch.Tensor, *params: torch.Tensor
) -> NF4Weight | None:
    """The NF4 layout of `module` when its forward on `x` (with the adapter's `params`) should
    take nf4_lowrank_linear: a bitsandbytes NF4 layer, a decode-sized input on a GPU, no
    gradient needed, kernels available."""
    if x.dim() != 3 or x.shape[0] * x.shape[1] > DECODE_MAX_TOKENS:
        return None
    if _kernel_for(x, *params) is None:
        return None
    cached = _fused_weights.get(module)
    data = getattr(getattr(module, "weight", None), "data", None)
    if cached is None or cached[0] != (None if data is None else data.data_ptr()):
        weight = NF4Weight.from_module(module)
        if weight is None or weight.packed.device != x.device:
            return None
        cached = (data.data_ptr(), weight)
        _fused_weights[module] = cached
    return cached[1]


def _kernel_for(x: torch.Tensor, *params: torch.Tensor):
    """The extension module when these inputs can take it, else None."""
    if not x.is_cuda or x.dtype not in _FLOAT_TYPES:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)):
        return None  # the kernels have no backward; training takes the reference
    return _extension()[0]


def _sequences(x: torch.Tensor, s_hat: torch.Tensor, r2: int) -> int | None:
    """How many sequences x (b, t, d_in) holds when s_hat has one state per sequence or one for
    all; None for shapes only the reference handles (it raises on bad ones)."""
    if x.dim() != 3 or s_hat.dim() != 3 or r2 > MAX_RANK:
        return None
    return s_hat.shape[0] if s_hat.shape[0] in (1, x.shape[0]) else None


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


@functools.cache
def _extension() -> tuple[object | None, str]:
    if os.environ.get("GENADAPTER_KERNELS", "auto") == "reference":
        return None, "reference"
    if not torch.cuda.is_available():
        return None, "reference"
    try:
        from . import _cuda_ext  # built by setup.py

        return _cuda_ext, "cuda_ext"
    except ImportError:
        pass
    try:
        return _build_jit(), "jit"
    except Exception as e:  # no toolkit, no sources, compiler error: the reference still works
        log.warning("CUDA kernels unavailable (%s); using the PyTorch reference path", e)
        return None, "reference"


def _build_jit():
    from torch.utils.cpp_extension import load

    sources = sorted(SOURCES.glob("*.cu"))
    if not sources or not (SOURCES / "binding.cpp").is_file():
        raise FileNotFoundError(f"no CUDA sources in {SOURCES}")
    log.info("Building the CUDA kernels once (JIT, a few minutes)")
    return load(
        name="genadapter_cuda_ext",
        sources=[str(SOURCES / "binding.cpp"), *map(str, sources)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        extra_include_paths=[str(SOURCES)],
        verbose=False,
    )
