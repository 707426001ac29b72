"""Builds the fused kernels in cuda_ext/ as `genadapter._cuda_ext` (for sm_80 and sm_90) when a
CUDA build of torch and nvcc are both present, e.g. `pip install --no-build-isolation -e .` on a
GPU machine; a plain install otherwise (an isolated build has no torch). Without the built
extension genadapter compiles the same sources at first use (JIT) or runs its pure-PyTorch
reference path: see genadapter/kernels.py and docs/KERNELS.md."""

import os
from pathlib import Path

from setuptools import setup

ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
]


def cuda_build() -> dict:
    if os.environ.get("GENADAPTER_NO_CUDA_EXT"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return {}
    sources = ["cuda_ext/binding.cpp", *sorted(str(p) for p in Path("cuda_ext").glob("*.cu"))]
    extension = CUDAExtension(
        "genadapter._cuda_ext",
        sources,
        include_dirs=[str(Path("cuda_ext").resolve())],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17", *ARCH_FLAGS]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_build())
