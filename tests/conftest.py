"""Shared fixtures. Models load in float32 on the CPU so comparisons can use tight tolerances.

The whole session (and every command it runs in a subprocess) reads the Debian corpora from a
fixture tree written for the tests (tests/corpus_fixture.py), never from this machine's /usr/share:
the suite needs nothing that `make setup` does not install."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import genadapter
from genadapter.base import Base, _converted_default_dir, default_gguf_path, load_base
from genadapter.eval import corpora
from genadapter.generator import Generator, GeneratorConfig
from genadapter.model import AdaptedModel

from . import corpus_fixture

_corpus_root: Path | None = None


def pytest_configure(config):
    """Before collection: build the fixture corpora and point genadapter.eval.corpora at them."""
    global _corpus_root
    _corpus_root = corpus_fixture.build(Path(tempfile.mkdtemp(prefix="genadapter-corpora-")))
    os.environ[corpora.ROOT_ENV] = str(_corpus_root)


def pytest_unconfigure(config):
    os.environ.pop(corpora.ROOT_ENV, None)
    if _corpus_root is not None:
        shutil.rmtree(_corpus_root, ignore_errors=True)


@pytest.fixture(scope="session")
def corpus_root() -> Path:
    """The fixture tree the corpora are read from in this session."""
    assert _corpus_root is not None and corpora.root() == _corpus_root
    return _corpus_root


# Small chunks so short test documents still span several chunks and chunk batches.
TEST_CHUNK = 64


@pytest.fixture(scope="session")
def default_dir():
    return _converted_default_dir(default_gguf_path())


@pytest.fixture(scope="session")
def model():
    """The default base with the default generator, as `genadapter.load()` gives it."""
    return genadapter.load(device="cpu", dtype=torch.float32, chunk_tokens=TEST_CHUNK)


@pytest.fixture(scope="session")
def untrained_model():
    """The default base with a fresh generator (B = 0)."""
    base = load_base(None, device="cpu", dtype=torch.float32)
    return AdaptedModel(base, Generator.for_base(base.model), chunk_tokens=TEST_CHUNK)


@pytest.fixture(scope="session")
def random_model():
    """The default base with a random generator whose B is nonzero: sessions change outputs."""
    base = load_base(None, device="cpu", dtype=torch.float32)
    gen = Generator.for_base(base.model, GeneratorConfig(seed=1)).randomize_(seed=2, scale=0.5)
    return AdaptedModel(base, gen, chunk_tokens=TEST_CHUNK, chunk_batch=3)


@pytest.fixture(scope="module")
def server(random_model, tmp_path_factory):
    """The server tests' server (tests/server_kit.py): a fresh store per test module, served by
    uvicorn on loopback, with an httpx client (`.http`) and the openai client (`.openai`). A module
    with a `server` fixture of its own uses that instead."""
    from .server_kit import openai_server  # uvicorn and openai only where a module asks

    with openai_server(random_model, tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="session")
def reference(default_dir):
    """The unwrapped transformers model, loaded on its own."""
    return AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()


def make_tiny_base(folder, tokenizer, layers: int = 2, hidden: int = 64, seed: int = 0):
    """A small random Llama with the default tokenizer, saved as a local Hugging Face folder."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


DOCUMENT = """The Vellmar Rail Company was founded in 1871 in the river town of Ostrava Minor.
Its first line ran 42 kilometres from the quarries at Dunmere to the harbour, carrying slate
for roofs.

By 1890 the company owned 31 locomotives, each named after a bird: the Kestrel, the Heron and the
Lapwing were the best known. The chief engineer, Agathe Lindqvist, designed a brake that let trains
descend the Dunmere grade safely in winter.

In 1923 the line was electrified. Passenger numbers peaked in 1951 at 2.4 million a year, then fell
as roads improved. The last slate train ran on 14 March 1968; the harbour branch is now a cycle path
and the Kestrel stands in the town museum, painted green and gold as it was in 1890.
"""


UMASK = 0o022  # a usual umask: what the project writes must be 0644 (folders 0755) under it


@contextmanager
def usual_umask():
    """Run the block under UMASK (the process's own is restored after)."""
    old = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(old)


def assert_umask_modes(root: Path, include_root: bool = True) -> None:
    """Every file under `root` has the mode a plain open() gives under UMASK, every folder the
    mode mkdir gives: no writer leaves an owner-only temp file's or temp folder's mode behind
    (another user, such as a service serving an exported adapter, must be able to read them).
    `include_root=False` for a folder the test made (pytest's tmp_path is owner-only)."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    assert len(paths) > 1 or root.is_file()
    paths = paths if include_root else paths[1:]
    for path in paths:
        want = (0o777 if path.is_dir() else 0o666) & ~UMASK
        assert stat.S_IMODE(path.stat().st_mode) == want, f"{path}: {oct(path.stat().st_mode)}"


__all__ = ["Base", "DOCUMENT", "TEST_CHUNK", "UMASK", "assert_umask_modes", "make_tiny_base"]
