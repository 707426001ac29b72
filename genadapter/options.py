"""The command-line options every front end shares (`chat`, `absorb`, `serve`, `eval`, `bench`):
which base, generator and device to load, checked before the slow model load; also the help
formatter and the UsageError the commands (genadapter/cli/) share.

This module sits below every command module and imports nothing heavy at import time (no torch),
so `genadapter --help` stays fast; torch is imported only to check `--device` and to load."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

QUANTIZE_CHOICES = ("auto", "nf4", "int8", "none")
# The generator's own advice names the Python argument; on the command line it is an option.
_PYTHON_ADVICE, _CLI_ADVICE = "generator=PATH", "--generator PATH"


class UsageError(Exception):
    """A bad command line (a missing file, an unusable device): reported in one line, exit 2."""


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs (the chat commands' table)."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Add --base, --generator, --device, --chunk-tokens, --quantize and the context memory's
    reading options to a command's parser."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--base",
        metavar="PATH",
        help="local Hugging Face folder or .gguf file (default: the embedded "
        "SmolLM2-135M-Instruct)",
    )
    group.add_argument(
        "--generator",
        metavar="PATH",
        help="trained generator folder, e.g. training/checkpoints/smollm2-135m-v0 (default: none, "
        "an untrained generator: answers are the base model's)",
    )
    group.add_argument(
        "--device", help="cpu, cuda, cuda:1 ... (default: cuda when a GPU is usable, else cpu)"
    )
    group.add_argument(
        "--chunk-tokens",
        type=positive_int,
        metavar="N",
        help="context chunk length in tokens (default: the generator's, 512)",
    )
    group.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="auto",
        help="base weights through bitsandbytes (default: auto, nf4 on CUDA and none on the CPU)",
    )
    group.add_argument(
        "--memory-budget",
        type=positive_int,
        metavar="N",
        help="context memory tokens a turn reads at most (default: 1024)",
    )
    group.add_argument(
        "--memory-fraction",
        type=fraction,
        metavar="F",
        help="and at most this share of the tokens the memory holds, at least one block "
        "(default: no such limit)",
    )
    group.add_argument(
        "--memory-block",
        type=positive_int,
        metavar="N",
        help="tokens per block of the memory that a turn selects among, set when absorbing "
        "(default: 128)",
    )


def quantize_arg(value: str) -> str | None:
    """--quantize's value as genadapter.load() takes it ("none" -> None)."""
    return None if value == "none" else value


def existing_file(path: str, option: str = "") -> None:
    """Raise UsageError unless `path` is a regular file; `option` names where it was given."""
    where = f"{option} {path}" if option else path
    if not Path(path).exists():
        raise UsageError(f"{where}: no such file")
    if not Path(path).is_file():
        raise UsageError(f"{where}: not a file")


def check_device(device: str | None) -> None:
    """Raise UsageError unless `device` names a device this machine can run on."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU found"
            raise UsageError(f"--device {device}: CUDA is not available here ({why}); use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return
    raise UsageError(f"--device {device}: not usable here (use cpu or cuda)")


def check_model_args(args: argparse.Namespace) -> None:
    """Everything about the model options that can be checked without loading the model."""
    if args.base is not None and not Path(args.base).exists():
        raise UsageError(f"--base {args.base}: no such file or folder")
    if args.generator is not None:
        folder = Path(args.generator)
        if not folder.is_dir():
            raise UsageError(f"--generator {args.generator}: no such folder")
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"--generator {args.generator}: not a generator folder (it has no config.json)"
            )
    check_device(args.device)


class _CommandLineAdvice(logging.Filter):
    """Rewrites the library's advice to pass `generator=PATH` into the option's spelling."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and _PYTHON_ADVICE in record.msg:
            record.msg = record.msg.replace(_PYTHON_ADVICE, _CLI_ADVICE)
        return True


def model_kwargs(args: argparse.Namespace, **overrides) -> dict:
    """Check the model options; the keyword arguments of genadapter.load() they stand for."""
    check_model_args(args)
    return {
        "base": args.base,
        "generator": args.generator,
        "device": args.device,
        "chunk_tokens": args.chunk_tokens,
        "quantize": quantize_arg(args.quantize),
        **{
            key: getattr(args, key)
            for key in ("memory_budget", "memory_fraction", "memory_block")
            if getattr(args, key, None) is not None
        },
        **overrides,
    }


def load_model(args: argparse.Namespace, **overrides):
    """Check the model options, then load the model they name (genadapter.load)."""
    kwargs = model_kwargs(args, **overrides)
    import genadapter

    advice = _CommandLineAdvice()
    logger = logging.getLogger("genadapter.model")
    logger.addFilter(advice)
    try:
        return genadapter.load(**kwargs)
    finally:
        logger.removeFilter(advice)
