"""The generator: small trainable projections, per adapted layer, that turn the hidden states of a
context pass into the state S (keys/values) and turn S into a weight delta (A, B).

For an adapted linear layer with input size d_in and output size d_out:
    h = RMSNorm(x)            x: the layer's own input during the context pass (T x d_in)
    K = h Wk^T, V = h Wv^T    (T x r1), (T x r2)
    S += K^T V                (r1 x r2), summed over every absorbed token ("same" pairing), or
    S += K[:-1]^T V[1:]       each token's key with the next token's value ("next" pairing);
                              "both": the first r2/2 value columns "same", the rest "next"
    y = W x + alpha * B (S_hat^T (A x)),   S_hat = normalize_svd(S, keep)

A generator may also (or only) carry an LM-head adapter, GeneratorConfig.head: genadapter/head.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from .head import HEAD_NAME, HeadAdapter, HeadConfig
from .state import AdapterState, atomic_write, normalize_svd

CONFIG_NAME = "config.json"
PAIRINGS = ("same", "next", "both")
KV_SOURCES = ("input", "residual")  # GeneratorConfig.kv_source
WEIGHTS_NAME = "generator.safetensors"


class GeneratorFormatError(ValueError):
    """A generator checkpoint that is missing files, malformed, or made for another base."""


@dataclass
class GeneratorConfig:
    targets: tuple[str, ...] = ("o_proj", "down_proj")  # module-name suffixes to adapt
    r1: int = 32
    r2: int = 32
    alpha: float = 1.0
    chunk_tokens: int = 512  # context chunk length the generator was trained with
    # "same": token t's key with t's own value (generators trained before this option existed).
    # "next": t's key with token t+1's value, so the state maps "what comes next here" to the
    # next token, which a question about the text can look up. "both": half the value columns
    # each way (docs/ARCHITECTURE.md).
    pairing: str = "same"
    # The LM-head adapter (genadapter/head.py) as a HeadConfig's fields, or None for none.
    head: dict | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)  # provenance: data, steps, eval figures
    # The top `keep` singular directions of each state form S_hat (state.normalize_svd; the
    # paper keeps r/8); None: every direction (generators trained before this option existed).
    keep: int | None = None
    # Where keys and values are read from: "input", each adapted layer's own input (generators
    # trained before this option existed); "residual", the residual stream entering the layer's
    # decoder block, as the paper does (arXiv 2411.05877; the query stays the layer's input).
    kv_source: str = "input"

    def __post_init__(self):
        check_pairing(self.pairing)
        if self.head is not None:
            HeadConfig(**self.head)  # validates
        if not self.targets and self.head is None:
            raise ValueError("a generator needs target layers, a head adapter, or both")
        if self.kv_source not in KV_SOURCES:
            raise ValueError(f"kv_source must be one of {KV_SOURCES}, not {self.kv_source!r}")
        if self.keep is not None and not 1 <= self.keep <= min(self.r1, self.r2):
            raise ValueError(f"keep must be in 1..{min(self.r1, self.r2)}, got {self.keep}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        # Options at their old behaviour are left out, so older generators keep their fingerprint.
        if d["keep"] is None:
            del d["keep"]
        if d["kv_source"] == "input":
            del d["kv_source"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GeneratorConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "targets" in known:
            known["targets"] = tuple(known["targets"])
        return cls(**known)


def check_pairing(pairing: str) -> None:
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, not {pairing!r}")


def find_targets(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """Linear layers of `model` whose last name component is in `targets`, by full name
    (none when `targets` is empty)."""
    if not targets:
        return {}
    found = {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features")
    }
    if not found:
        raise ValueError(f"no linear layers named {targets} in the base model")
    return found


class LayerAdapter(nn.Module):
    """Wk, Wv (context -> state) and A, B (state -> delta) for one adapted layer. Keys and
    values read `d_kv` features (the layer's input, d_in, or the residual stream: kv_source)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        r1: int,
        r2: int,
        alpha: float,
        g: torch.Generator,
        pairing: str = "same",
        d_kv: int | None = None,
        kv_source: str = "input",
    ):
        super().__init__()
        self.alpha = alpha
        self.pairing = pairing
        self.kv_source = kv_source
        self.eps = 1e-6
        d_kv = d_kv or d_in
        self.norm = nn.Parameter(torch.ones(d_kv))
        self.Wk = nn.Parameter(torch.randn(r1, d_kv, generator=g) / d_kv**0.5)
        self.Wv = nn.Parameter(torch.randn(r2, d_kv, generator=g) / d_kv**0.5)
        self.A = nn.Parameter(torch.randn(r1, d_in, generator=g) / d_in**0.5)
        # Zero B: a fresh generator's delta is exactly zero, so training starts from the base.
        self.B = nn.Parameter(torch.zeros(d_out, r2))

    def kv_sums(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """Per sequence, sum over its tokens of k v^T: (b, t, d_in) -> (b, r1, r2), float32,
        also under a bfloat16 autocast (training's): a state summed in bf16 rounds away the
        weak directions that inference, in float32, keeps (issue 24)."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
            return pair_sums(h @ self.Wk.T, h @ self.Wv.T, token_mask, self.pairing)

    def delta(self, x: torch.Tensor, s_hat: torch.Tensor) -> torch.Tensor:
        """alpha * B (S_hat^T (A x)) per sequence: x (b, t, d_in), s_hat (b, r1, r2)."""
        z = (x.float() @ self.A.T) @ s_hat
        return self.alpha * (z @ self.B.T)

    def fold(self, s_hat: torch.Tensor) -> torch.Tensor:
        """alpha S_hat^T A: s_hat (r1, r2) -> (r2, d_in) float32, one state's delta as a LoRA
        down-projection (B the up-projection): delta(x, s_hat) = B (fold(s_hat) x)."""
        return self.alpha * (s_hat.float().mT @ self.A.float())


def pair_sums(
    k: torch.Tensor, v: torch.Tensor, token_mask: torch.Tensor | None, pairing: str
) -> torch.Tensor:
    """Per sequence, k_t v_t^T ("same") or k_t v_{t+1}^T ("next") summed over the pairs whose
    tokens are all real (unmasked); "both": the first half of v's columns "same", the rest "next".
    (b, t, r1), (b, t, r2) -> (b, r1, r2)."""
    if pairing == "both":
        half = v.shape[-1] // 2
        same = pair_sums(k, v[..., :half], token_mask, "same")
        return torch.cat([same, pair_sums(k, v[..., half:], token_mask, "next")], dim=-1)
    if pairing == "next":
        k, v = k[:, :-1], v[:, 1:]
        if token_mask is not None:
            token_mask = token_mask[:, :-1] * token_mask[:, 1:]
    if token_mask is not None:
        k = k * token_mask.unsqueeze(-1).to(k.dtype)
    return k.mT @ v


class Generator(nn.Module):
    def __init__(
        self,
        config: GeneratorConfig,
        shapes: dict[str, tuple[int, int]],
        hidden_size: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.shapes = dict(shapes)  # adapted layer name -> (d_in, d_out)
        self.hidden_size = hidden_size
        g = torch.Generator().manual_seed(config.seed)  # same seed, same fresh generator
        residual = config.kv_source == "residual"
        if residual and not hidden_size:
            raise ValueError("keys and values from the residual stream need the hidden size")
        self.layers = nn.ModuleDict(
            {
                _key(name): LayerAdapter(
                    d_in,
                    d_out,
                    config.r1,
                    config.r2,
                    config.alpha,
                    g,
                    config.pairing,
                    hidden_size if residual else None,
                    config.kv_source,
                )
                for name, (d_in, d_out) in self.shapes.items()
            }
        )
        self.head: HeadAdapter | None = None
        if config.head is not None:
            if not hidden_size:
                raise ValueError("a head adapter needs the base's hidden size")
            self.head = HeadAdapter(hidden_size, HeadConfig(**config.head), g)

    @classmethod
    def for_base(cls, model: nn.Module, config: GeneratorConfig | None = None) -> Generator:
        config = config or GeneratorConfig()
        targets = find_targets(model, config.targets)
        shapes = {n: (m.in_features, m.out_features) for n, m in targets.items()}
        generator = cls(config, shapes, model.config.hidden_size)
        layer = generator.head.config.key_layer if generator.head is not None else None
        if layer is not None and layer > model.config.num_hidden_layers:
            raise ValueError(
                f"head key layer:{layer} is past the base's "
                f"{model.config.num_hidden_layers} decoder layers"
            )
        return generator

    def set_pairing(self, pairing: str) -> Generator:
        """Switch how keys pair with values, e.g. to go on training a "same" generator as "next"."""
        check_pairing(pairing)
        self.config.pairing = pairing
        for layer in self.layers.values():
            layer.pairing = pairing
        return self

    def adapter(self, name: str) -> LayerAdapter:
        return self.layers[_key(name)]

    def state_shapes(self) -> dict[str, tuple[int, int]]:
        """State name -> (r1, r2): one per adapted layer, and `lm_head` for the head adapter."""
        shapes = {name: (self.config.r1, self.config.r2) for name in self.shapes}
        if self.head is not None:
            shapes[HEAD_NAME] = (self.head.config.r1, self.head.config.r2)
        return shapes

    def normalized(self, state: AdapterState) -> dict[str, torch.Tensor]:
        """S_hat per state name: the polar factor for adapted layers, the head adapter's own
        scaling for `lm_head`. Cached on the state until it changes."""

        def one(name: str, S: torch.Tensor) -> torch.Tensor:
            if name == HEAD_NAME and self.head is not None:
                return self.head.normalize(S, state.tokens)
            return normalize_svd(S, self.config.keep)

        return state.normalized(one)

    def folded(self, state: AdapterState) -> dict[str, torch.Tensor]:
        """Per adapted layer (the LM-head adapter excluded), alpha S_hat^T A (r2, d_in) float32:
        the state's delta as a LoRA down-projection, B being the up-projection. Cached on the
        state until it changes; what a session's decoding reads instead of A and S_hat."""

        def make() -> dict[str, torch.Tensor]:
            s_hat = self.normalized(state)
            return {name: self.adapter(name).fold(s_hat[name]) for name in self.shapes}

        return state.derived("folded", make)

    def fingerprint(self) -> str:
        """Identity of these exact weights; a saved session is bound to it."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name, p in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def randomize_(self, seed: int, scale: float = 1.0) -> Generator:
        """Nonzero B (an untrained but active generator), for tests and benchmarks."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.layers.values():
                d_out, r2 = layer.B.shape
                layer.B.copy_(torch.randn(d_out, r2, generator=g) * scale / r2**0.5)
            if self.head is not None:
                d, r2 = self.head.B.shape
                self.head.B.copy_(torch.randn(d, r2, generator=g) * scale / r2**0.5)
        return self

    def save_pretrained(
        self, folder: str | os.PathLike, base_fingerprint: str, dtype: torch.dtype | None = None
    ) -> None:
        """Write generator.safetensors and config.json; `dtype` (e.g. bfloat16) halves the size
        of a shipped checkpoint, loading upcasts to float32."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.detach().to(dtype or v.dtype).cpu().contiguous()
            for k, v in self.state_dict().items()
        }
        # atomic_write, not safetensors' save_file: that one creates the file owner-only (0600).
        atomic_write(folder / WEIGHTS_NAME, save(tensors))
        meta = {
            "format": "genadapter-generator/1",
            "base_fingerprint": base_fingerprint,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "hidden_size": self.hidden_size,
            "config": self.config.to_dict(),
        }
        atomic_write(folder / CONFIG_NAME, json.dumps(meta, indent=2).encode())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, base_fingerprint: str | None) -> Generator:
        folder = Path(folder)
        try:
            meta = json.loads((folder / CONFIG_NAME).read_text())
            config = GeneratorConfig.from_dict(meta["config"])
            shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
        except FileNotFoundError as e:
            raise GeneratorFormatError(f"{folder}: no {CONFIG_NAME}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise GeneratorFormatError(f"{folder}/{CONFIG_NAME} is malformed: {e}") from e
        if base_fingerprint and meta.get("base_fingerprint") != base_fingerprint:
            raise GeneratorFormatError(
                f"{folder} was trained for base {meta.get('base_fingerprint')}, "
                f"this base is {base_fingerprint}"
            )
        generator = cls(config, shapes, meta.get("hidden_size"))
        try:
            tensors = load_file(folder / WEIGHTS_NAME)
        except FileNotFoundError as e:
            raise GeneratorFormatError(f"{folder}: no {WEIGHTS_NAME}") from e
        except Exception as e:
            raise GeneratorFormatError(f"{folder}/{WEIGHTS_NAME} is unreadable: {e}") from e
        expected = generator.state_dict()
        bad = {k for k in expected if k not in tensors or tensors[k].shape != expected[k].shape}
        if bad or tensors.keys() != expected.keys():
            raise GeneratorFormatError(
                f"{folder}/{WEIGHTS_NAME} does not match its config "
                f"({len(bad)} missing or misshapen tensors)"
            )
        generator.load_state_dict({k: v.float() for k, v in tensors.items()})
        return generator


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot contain dots
