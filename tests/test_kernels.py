"""genadapter.kernels: the pure-PyTorch reference path on the CPU (against bitsandbytes and
against straightforward element-by-element computations), the nvcc compile check of cuda_ext/,
and, on a CUDA machine, the kernels against the reference on random shapes."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from genadapter import kernels
from genadapter.generator import LayerAdapter
from genadapter.kernels import NF4_LEVELS, NF4Weight, dequantize_nf4, quantize_nf4
from genadapter.layers import AdaptedLinear, Binding, bound

CUDA_EXT = Path(__file__).resolve().parent.parent / "cuda_ext"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


def adapter(d_in: int, d_out: int, r1: int, r2: int, seed: int) -> LayerAdapter:
    """A LayerAdapter with every parameter random (B included, so the delta is not zero)."""
    g = torch.Generator().manual_seed(seed)
    a = LayerAdapter(d_in, d_out, r1, r2, alpha=0.7, g=g)
    with torch.no_grad():
        a.B.copy_(torch.randn(d_out, r2, generator=g) / r2**0.5)
        a.norm.copy_(1 + 0.1 * torch.randn(d_in, generator=g))
    return a.requires_grad_(False)


def elementwise_dequantize(w: NF4Weight) -> torch.Tensor:
    """The layout's definition, one element at a time (small weights only)."""
    rows, cols = w.shape
    levels = torch.tensor(NF4_LEVELS)
    out = torch.empty(rows * cols)
    for e in range(rows * cols):  # float32 arithmetic throughout, as the layout specifies
        byte = int(w.packed[e // 2])
        code = byte >> 4 if e % 2 == 0 else byte & 0xF
        block = e // w.blocksize
        if w.nested_code is None:
            absmax = w.absmax[block]
        else:
            outer = w.nested_absmax[block // w.nested_blocksize]
            absmax = w.nested_code[int(w.absmax[block])] * outer + w.nested_offset
        out[e] = levels[code] * absmax
    return out.reshape(rows, cols)


# -- the NF4 layout, on the CPU ---------------------------------------------------------------


def test_nf4_levels_are_bitsandbytes_levels():
    F = bnb_functional()
    assert torch.equal(torch.tensor(NF4_LEVELS), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape", [(64, 576), (37, 128), (3, 64), (33, 17)])
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_reads_bitsandbytes_layout_exactly(shape, nested):
    F = bnb_functional()
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    packed, state = F.quantize_4bit(
        weight, blocksize=64, compress_statistics=nested, quant_type="nf4"
    )
    ours = dequantize_nf4(NF4Weight.from_quant_state(packed, state))
    assert torch.equal(ours, F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape,blocksize", [((7, 45), 64), ((5, 13), 32), ((9, 40), 64)])
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_follows_the_layout_on_odd_shapes(shape, blocksize, nested):
    # Blocks straddle rows and the element count can be odd: the flat layout decides.
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    w = quantize_nf4(weight, blocksize=blocksize, nested=nested, nested_blocksize=2)
    assert torch.equal(dequantize_nf4(w), elementwise_dequantize(w))


@pytest.mark.parametrize("shape", [(64, 576), (16, 128)])
def test_quantize_nf4_matches_bitsandbytes_codes(shape):
    F = bnb_functional()
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    packed, state = F.quantize_4bit(
        weight, blocksize=64, compress_statistics=False, quant_type="nf4"
    )
    ours = quantize_nf4(weight, nested=False)
    theirs = NF4Weight.from_quant_state(packed, state)
    assert torch.equal(ours.packed, theirs.packed)
    assert torch.equal(ours.absmax, theirs.absmax)


def test_quantize_nf4_error_is_bounded_by_the_level_spacing():
    weight = torch.randn(96, 320, generator=torch.Generator().manual_seed(6)) * 0.05
    plain = quantize_nf4(weight, nested=False)
    # Nearest level: the error is at most half the widest gap (-1 to -0.696) times the absmax.
    half_gap = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2
    scale = plain.absmax.repeat_interleave(64).reshape(weight.shape)
    assert ((dequantize_nf4(plain) - weight).abs() <= half_gap * scale * (1 + 1e-6)).all()
    # Double quantization moves each absmax by at most half a step of its 256-level grid.
    nested = quantize_nf4(weight, nested=True)
    step = 2 / 255 * nested.nested_absmax.repeat_interleave(256)[: plain.absmax.numel()]
    assert ((kernels.block_absmax(nested) - plain.absmax).abs() <= step / 2 * (1 + 1e-5)).all()


# -- reference operations, on the CPU ---------------------------------------------------------


@pytest.mark.parametrize("b,t,d_in,d_out,r1,r2", [(1, 1, 64, 96, 8, 8), (3, 5, 72, 33, 5, 12)])
def test_reference_delta_and_sums_are_the_generator_math(b, t, d_in, d_out, r1, r2):
    a = adapter(d_in, d_out, r1, r2, seed=b * t)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, t, d_in, generator=g)
    s_hat = torch.randn(b, r1, r2, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).long()
    # Bit-exact: the CPU path must stay what it was before the kernels existed.
    assert torch.equal(kernels.lowrank_delta(x, a.A, a.B, s_hat, a.alpha), a.delta(x, s_hat))
    assert torch.equal(kernels.kv_sums(x, a.norm, a.Wk, a.Wv, mask, a.eps), a.kv_sums(x, mask))
    # And that math is the definition, token by token (float32 rounding apart).
    for i in range(b):
        for j in range(t):
            z = s_hat[i].T @ (a.A @ x[i, j])
            expect = a.alpha * (a.B @ z)
            got = kernels.lowrank_delta_reference(x, a.A, a.B, s_hat, a.alpha)[i, j]
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        S = torch.zeros(r1, r2)
        for j in range(t):
            h = x[i, j] / (x[i, j].pow(2).mean() + a.eps).sqrt() * a.norm
            S += mask[i, j] * torch.outer(a.Wk @ h, a.Wv @ h)
        torch.testing.assert_close(
            kernels.kv_sums_reference(x, a.norm, a.Wk, a.Wv, mask, a.eps)[i],
            S,
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.parametrize("shared_state", [False, True])
def test_reference_nf4_lowrank_linear(shared_state):
    g = torch.Generator().manual_seed(8)
    rows, cols, b, t, r1, r2 = 45, 128, 3, 2, 6, 10
    w = quantize_nf4(torch.randn(rows, cols, generator=g))
    a = adapter(cols, rows, r1, r2, seed=9)
    bias = torch.randn(rows, generator=g)
    x = torch.randn(b, t, cols, generator=g)
    s_hat = torch.randn(1 if shared_state else b, r1, r2, generator=g)
    out = torch.full((b, t, rows), float("nan"))
    y = kernels.nf4_lowrank_linear(x, w, bias, a.A, a.B, s_hat, a.alpha, out=out)
    assert y is out and torch.isfinite(out).all()
    W = elementwise_dequantize(w)
    for i in range(b):
        state = s_hat[0 if shared_state else i]
        for j in range(t):
            expect = W @ x[i, j] + bias + a.alpha * (a.B @ (state.T @ (a.A @ x[i, j])))
            torch.testing.assert_close(out[i, j], expect, rtol=1e-5, atol=1e-5)


def test_reference_backend_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert kernels.backend() == "reference"
    layer = torch.nn.Linear(64, 64)
    assert kernels.fused_nf4_weight(layer, torch.randn(1, 1, 64)) is None


def test_adapted_layer_on_cpu_is_base_plus_generator_delta(random_model):
    """The dispatch added to layers.py leaves the CPU forward bit-for-bit as it was."""
    layer = random_model.base.model.layers[3].mlp.down_proj
    assert isinstance(layer, AdaptedLinear)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, layer.base.in_features, generator=g)
    s_hat = torch.randn(2, *random_model.generator.state_shapes()[layer.name], generator=g)
    binding: Binding = layer.binding
    with torch.no_grad(), bound(binding, s_hat={layer.name: s_hat}):
        y = layer(x)
    expect = layer.base(x) + layer.adapter.delta(x, s_hat).to(x.dtype)
    assert torch.equal(y, expect)


# -- compile check, no GPU needed ---------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_EXT.glob("*.cu")))
def test_cuda_sources_compile_for_sm80_and_sm90(source, tmp_path):
    """Each .cu file as setup.py builds it (about 10-20 s each on a 2-core machine); the torch
    binding needs a CUDA build of torch and is compiled only where one exists."""
    cmd = [
        "nvcc",
        "-c",
        "-O3",
        "-std=c++17",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        f"-I{CUDA_EXT}",
        str(CUDA_EXT / source),
        "-o",
        str(tmp_path / (source + ".o")),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr.lower(), done.stderr


# -- the kernels against the reference, on a GPU ------------------------------------------------

# bfloat16 keeps 8 significant bits: an output rounds by up to 2^-9 of its size. Both sides read
# the same bfloat16 inputs and accumulate in float32, so beyond that rounding only the order of
# the sums differs. Tolerance: 2^-7 of each value plus 2^-10 of the largest.
TOLERANCE = {
    torch.bfloat16: (2**-7, 2**-10),
    torch.float16: (2**-9, 2**-12),
    torch.float32: (1e-5, 1e-6),
}


def assert_close_to(got: torch.Tensor, expect: torch.Tensor, dtype: torch.dtype) -> None:
    rel, floor = TOLERANCE[dtype]
    expect = expect.float()
    bound_ = rel * expect.abs() + floor * expect.abs().max()
    err = (got.float() - expect).abs()
    assert torch.isfinite(got).all()
    assert (err <= bound_).all(), f"max error {err.max():.3g} (bound {bound_.max():.3g})"


@needs_cuda
def test_cuda_kernels_are_built():
    assert kernels.backend() in ("cuda_ext", "jit")


SHAPES = [(64, 64), (37, 96), (100, 72), (33, 17), (257, 1000), (4096, 4096)]


@functools.cache
def random_nf4(rows: int, cols: int, nested: bool) -> NF4Weight:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols))
    w = quantize_nf4(weight, nested=nested)
    return NF4Weight(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in vars(w).items()})


@needs_cuda
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 8, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_nf4_lowrank_linear(rows, cols, batch, dtype):
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(rows + cols + batch)
    r1, r2 = (5, 12) if rows % 2 else (32, 32)
    w = random_nf4(rows, cols, nested=rows != 64)
    a = adapter(cols, rows, r1, r2, seed=batch).to(dev)
    bias = torch.randn(rows, generator=g).to(dev, dtype) if cols % 2 else None
    for tokens in (1, 2):
        x = torch.randn(batch, tokens, cols, generator=g).to(dev, dtype)
        s_hat = torch.randn(batch, r1, r2, generator=g).to(dev)
        out = torch.full((batch, tokens, rows), float("nan"), device=dev, dtype=dtype)
        kernels.nf4_lowrank_linear(x, w, bias, a.A, a.B, s_hat, a.alpha, out=out)
        expect = kernels.nf4_lowrank_linear_reference(x, w, bias, a.A, a.B, s_hat, a.alpha)
        assert_close_to(out, expect, dtype)


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 5, 64, 200])
@pytest.mark.parametrize(
    "d_in,d_out,r1,r2", [(64, 64, 32, 32), (72, 33, 5, 12), (1000, 257, 24, 40)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_lowrank_delta(tokens, d_in, d_out, r1, r2, dtype):
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(tokens + d_in)
    a = adapter(d_in, d_out, r1, r2, seed=tokens).to(dev)
    for batch in (1, 3):
        x = torch.randn(batch, tokens, d_in, generator=g).to(dev, dtype)
        s_hat = torch.randn(batch, r1, r2, generator=g).to(dev)
        out = torch.full((batch, tokens, d_out), float("nan"), device=dev, dtype=dtype)
        kernels.lowrank_delta(x, a.A, a.B, s_hat, a.alpha, out=out)
        expect = kernels.lowrank_delta_reference(x, a.A, a.B, s_hat, a.alpha)
        assert_close_to(out, expect, dtype)


@needs_cuda
@pytest.mark.parametrize(
    "b,t,d_in,r1,r2", [(1, 7, 64, 32, 32), (4, 512, 576, 32, 32), (3, 33, 100, 5, 17)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kv_sums(b, t, d_in, r1, r2, dtype):
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(b * t)
    a = adapter(d_in, 8, r1, r2, seed=t).to(dev)
    x = torch.randn(b, t, d_in, generator=g).to(dev, dtype)
    mask = (torch.rand(b, t, generator=g) > 0.2).long().to(dev)
    out = torch.full((b, r1, r2), float("nan"), device=dev)
    kernels.kv_sums(x, a.norm, a.Wk, a.Wv, mask, a.eps, out=out)
    expect = kernels.kv_sums_reference(x, a.norm, a.Wk, a.Wv, mask, a.eps)
    # float32 on both sides (x is read in its dtype, then everything is float32): only the
    # order of the sums over tokens and d_in differs.
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4 * expect.abs().max().item())


@needs_cuda
def test_cuda_adapted_nf4_layer_takes_the_fused_path():
    bnb = pytest.importorskip("bitsandbytes")
    from genadapter.quantize import quantize_linear

    dev = torch.device("cuda")
    linear = torch.nn.Linear(576, 1536, bias=False).to(dev, torch.bfloat16)
    quantized = quantize_linear(linear, "nf4")
    assert isinstance(quantized, bnb.nn.Linear4bit)
    a = adapter(576, 1536, 32, 32, seed=11).to(dev)
    layer = AdaptedLinear("probe", quantized, a, Binding())
    x = torch.randn(4, 1, 576, device=dev, dtype=torch.bfloat16)
    s_hat = torch.randn(4, 32, 32, device=dev)
    assert kernels.fused_nf4_weight(quantized, x, a.A, a.B, s_hat) is not None
    with torch.no_grad(), bound(layer.binding, s_hat={"probe": s_hat}):
        fused = layer(x)
    w = NF4Weight.from_module(quantized)
    expect = kernels.nf4_lowrank_linear_reference(x, w, None, a.A, a.B, s_hat, a.alpha)
    assert_close_to(fused, expect, torch.bfloat16)
    # bitsandbytes' own matmul plus the delta agrees with it too (same weights, another kernel).
    unfused = quantized(x).float() + kernels.lowrank_delta_reference(x, a.A, a.B, s_hat, a.alpha)
    assert_close_to(fused, unfused, torch.bfloat16)
