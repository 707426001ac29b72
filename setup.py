"""Plain install. The fused kernels in cuda_ext/ get built here once they exist (a later issue);
until then, and on machines without a CUDA toolkit and a CUDA build of torch, genadapter runs on
its pure-PyTorch path."""

from setuptools import setup

setup()
