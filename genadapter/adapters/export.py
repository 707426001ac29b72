"""A session's delta as an ordinary LoRA: the PEFT adapter folder that transformers + PEFT, vLLM
and other multi-LoRA engines load, and a full model folder with the delta merged into the weights.

For an adapted layer the session's delta is Delta W = alpha B S_hat^T A (generator.py), so
    lora_A = alpha S_hat^T A    (r2 x d_in; generator.folded),    lora_B = B    (d_out x r2)
with PEFT's scaling lora_alpha / r = 1. Nothing here imports PEFT: the folder is two files,
adapter_config.json and adapter_model.safetensors, in PEFT's layout.

Only the adapter state is exported: a session's context memory (the absorbed chunks' own keys and
values, memory.py) changes attention, not weights, so no LoRA expresses it. Exporting a session
whose memory is not empty says so (`memory_note`: a logged warning, and the CLI prints it)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..state import AdapterState, atomic_write, file_mode

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
INFO_FILE = "genadapter.json"  # provenance, beside PEFT's files (PEFT warns on unknown keys)
# PEFT's key of a LoRA factor: base_model.model.<module>.lora_A.weight (no adapter name).
_PREFIX = "base_model.model."


class ExportError(ValueError):
    """A session or folder that cannot be written or read as a PEFT LoRA."""


@dataclass
class LoraAdapter:
    """One LoRA: per module name (e.g. model.layers.0.self_attn.o_proj), factors (A, B) with
    Delta W = B @ A; A (r, d_in), B (d_out, r), float32, the same r for every module.

    base: the folder of the float weights it applies to (PEFT's base_model_name_or_path).
    info: provenance written into the adapter's README and config (tokens, generator, merge)."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base: str = ""
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.values())

    @property
    def targets(self) -> list[str]:
        """The modules' last name components, PEFT's target_modules."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.weights})

    def delta(self, name: str) -> torch.Tensor:
        """Delta W of one module, (d_out, d_in) float32."""
        a, b = self.weights[name]
        return b.float() @ a.float()

    def save(self, folder: str | os.PathLike) -> Path:
        """Write adapter_config.json and adapter_model.safetensors (PEFT's format, scaling 1;
        modules of lower rank are zero-padded to the common rank), genadapter.json (`info`) and
        a README.md."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        r = self.rank
        tensors = {}
        for name, (a, b) in self.weights.items():
            pad = r - a.shape[0]
            a = torch.nn.functional.pad(a.float(), (0, 0, 0, pad))
            b = torch.nn.functional.pad(b.float(), (0, pad))
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.detach().cpu().contiguous()
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.detach().cpu().contiguous()
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base,
            "r": r,
            "lora_alpha": r,  # scaling lora_alpha / r = 1: alpha is already inside lora_A
            "lora_dropout": 0.0,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "inference_mode": True,
        }
        atomic_write(folder / WEIGHTS_FILE, save(tensors))
        atomic_write(folder / CONFIG_FILE, json.dumps(config, indent=2).encode())
        atomic_write(folder / INFO_FILE, json.dumps(self.info, indent=2).encode())
        atomic_write(folder / "README.md", _readme(self).encode())
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LoraAdapter:
        """A PEFT LoRA folder (ours or any plain LoRA on linear layers), with PEFT's scaling
        (lora_alpha / r, or / sqrt(r) with rsLoRA) folded into B. Raises ExportError for other
        adapter types (DoRA, biases, modules_to_save, rank or alpha patterns)."""
        folder = Path(folder)
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            tensors = load_file(folder / WEIGHTS_FILE)
        except (OSError, ValueError) as e:
            raise ExportError(f"{folder}: not a PEFT adapter folder ({e})") from e
        unsupported = [
            k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern")
            if config.get(k)
        ]  # fmt: skip
        if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none" or unsupported:
            raise ExportError(f"{folder}: only plain LoRA adapters merge ({unsupported or 'type'})")
        r = config["r"]
        scale = config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r)
        weights = {}
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                name = key[: -len(".lora_A.weight")].removeprefix(_PREFIX)
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                weights[name] = (a.float(), b.float() * scale)
        if not weights:
            raise ExportError(f"{folder}: no LoRA weights")
        info = folder / INFO_FILE
        info = json.loads(info.read_text()) if info.is_file() else {}
        return cls(weights, config.get("base_model_name_or_path", ""), info)


def memory_note(memory) -> str | None:
    """What exporting leaves out of a session whose context memory is not empty; None for an
    empty (or no) memory."""
    if memory is None or memory.is_empty:
        return None
    return (
        f"the session's memory ({memory.tokens} tokens) cannot be expressed as a LoRA and is not "
        "exported: the export holds the adapter state only"
    )


def export_session(
    session, folder: str | os.PathLike, merged: bool = False, warn: bool = True
) -> Path:
    """Session.to_peft: `session`'s adapter as a PEFT LoRA folder, or with `merged`, a model folder
    with the delta merged (see session_lora and write_merged). The memory is not exported: when
    it is not empty, a warning says so (with `warn`) and the folder's genadapter.json and README
    record the tokens left out."""
    lora = session_lora(session.model, session.state)
    note = memory_note(getattr(session, "memory", None))
    if note is not None:
        if warn:
            log.warning(note)
        lora.info["memory_tokens_not_exported"] = session.memory.tokens
    return write_merged(session.model, lora, folder) if merged else lora.save(folder)


def session_lora(model, state: AdapterState) -> LoraAdapter:
    """The delta of `state` under `model`'s generator as a LoraAdapter (rank r2 per layer).

    Raises ExportError when the generator has an LM-head adapter (genadapter/head.py is still
    experimental; its delta would be a LoRA on the tied lm_head, which this does not write).
    Logs a warning when the base runs quantized: the LoRA is exact, but applies to the float
    weights of `base`, whose outputs differ from the quantized base's by the quantization error."""
    generator = model.generator
    if generator.head is not None:
        raise ExportError(
            "this generator has an LM-head adapter (experimental, genadapter/head.py); "
            "PEFT export writes adapters on linear layers only"
        )
    base = _base_folder(model)
    info = {
        "base": model.base_name,
        "base_fingerprint": model.base_fingerprint,
        "generator_fingerprint": model.generator_fingerprint,
        "tokens": state.tokens,
        "documents": state.documents,
    }
    quantized = quantized_mode(model.base)
    if quantized:
        info["quantized_base"] = quantized
        log.warning(
            "the base runs %s-quantized here; the exported LoRA applies to its float weights at "
            "%s, whose outputs differ from the quantized base's by the quantization error",
            quantized,
            base,
        )
    # The down-projection is the decode path's own fold, alpha S_hat^T A (generator.folded).
    folded = generator.folded(state) if not state.is_empty else {}
    weights = {}
    for name in generator.shapes:
        adapter = generator.adapter(name)
        if name in folded:
            a = folded[name]
        else:  # an empty session: exactly the base
            a = torch.zeros(adapter.B.shape[1], adapter.A.shape[1], device=adapter.A.device)
        weights[name] = (a.cpu(), adapter.B.float().cpu())
    return LoraAdapter(weights, base, info)


def write_merged(model, lora: LoraAdapter, folder: str | os.PathLike) -> Path:
    """A full transformers model folder: the float base weights (read again from their folder,
    not the possibly quantized ones in memory) with each Delta W added, and the tokenizer.
    `AutoModelForCausalLM.from_pretrained(folder)` loads it with no genadapter or PEFT code."""
    from transformers import AutoModelForCausalLM

    source = lora.base or _base_folder(model)
    merged = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for name, (a, b) in lora.weights.items():
            weight = merged.get_submodule(name).weight
            # In float64, so W + B A is rounded once, to the weight's dtype.
            weight.copy_(weight.double() + b.double() @ a.double())
    folder = Path(folder)
    merged.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    atomic_write(folder / "README.md", _readme(lora, merged=True).encode())
    # transformers writes its weights owner-only (0600); a service running as another user
    # must be able to read them, as every other file the user writes.
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(file_mode())
    return folder


def quantized_mode(base: torch.nn.Module) -> str | None:
    """'nf4' or 'int8' when bitsandbytes layers replaced the base's linear layers, else None."""
    for module in base.modules():
        kind = type(module).__name__
        if kind == "Linear4bit":
            return "nf4"
        if kind == "Linear8bitLt":
            return "int8"
    return None


def _base_folder(model) -> str:
    """Where transformers loaded the base from (for the default base: the converted folder)."""
    folder = getattr(model.base.config, "_name_or_path", "")
    if not folder or not (Path(folder) / "config.json").is_file():
        raise ExportError(f"the base's float weights are not in a local folder ({folder!r})")
    return str(folder)


def _readme(lora: LoraAdapter, merged: bool = False) -> str:
    what = "model with a genadapter session merged into" if merged else "LoRA adapter made from"
    lines = [
        f"# A {what} its weights" if merged else f"# A {what} a genadapter session",
        "",
        f"Base (float weights): `{lora.base}`",
        "",
        *(f"- {k}: {v}" for k, v in sorted(lora.info.items())),
    ]
    if lora.info.get("quantized_base"):
        lines += [
            "",
            f"The session ran on a {lora.info['quantized_base']}-quantized base; this applies "
            "the same delta to the float weights.",
        ]
    return "\n".join(lines) + "\n"
