"""The command line, run as a user would: a subprocess with piped standard input."""

import subprocess
import sys

import torch

from .conftest import DOCUMENT


def run_cli(*args, stdin="", timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "genadapter.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_absorb_command_saves_a_loadable_session(model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    out = run_cli(
        "absorb", str(doc), str(doc), "--out", str(tmp_path / "s"), "--chunk-tokens", "64"
    )
    assert out.returncode == 0, out.stderr
    loaded = model.load_session(tmp_path / "s")
    direct = model.session()
    direct.absorb(DOCUMENT)
    direct.absorb(DOCUMENT)
    assert loaded.state.tokens == direct.state.tokens and loaded.state.documents == 2
    for name, S in direct.state.sums.items():
        assert torch.allclose(loaded.state.sums[name], S, rtol=1e-5, atol=1e-5)


def test_absorb_command_quantizes_the_base_when_asked(model, tmp_path):
    # --quantize reaches genadapter.load(): the int8 base's state is close to the float one's
    # (tests/test_quantize.py bounds how close) but not identical.
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    out = run_cli(
        "absorb", str(doc), "--out", str(tmp_path / "q"), "--chunk-tokens", "64",
        "--quantize", "int8",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    loaded = model.load_session(tmp_path / "q")
    direct = model.session()
    direct.absorb(DOCUMENT)
    cosines = [
        torch.nn.functional.cosine_similarity(loaded.state.sums[n].flatten(), S.flatten(), dim=0)
        for n, S in direct.state.sums.items()
    ]
    assert 0.9 < sum(cosines) / len(cosines) < 1 - 1e-6


def test_chat_repl_commands(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\xff\xfe\x00\x01")
    script = "\n".join(
        [
            "/stats",
            "What is the capital of France?",
            f"/absorb {bad}",
            f"/absorb {tmp_path / 'missing.txt'}",
            f"/save {tmp_path / 'saved'}",
            "/reset",
            "/stats",
            f"/load {tmp_path / 'saved'}",
            "/quit",
            "never read",
        ]
    )
    out = run_cli("chat", "--doc", str(doc), "--max-new-tokens", "16", stdin=script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("Paris" in line for line in lines)
    stats = [line for line in lines if line.startswith("documents")]
    assert stats[0].startswith("documents 1, tokens") and "tokens 0" not in stats[0]
    assert stats[1].startswith("documents 0, tokens 0")
    assert any(line.startswith("loaded") and "documents 1" in line for line in lines)
    assert "not UTF-8" in out.stderr and "no such file" in out.stderr
    assert (tmp_path / "saved" / "state.safetensors").is_file()


def test_cli_errors_are_clear(tmp_path):
    out = run_cli("absorb", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "s"))
    assert out.returncode == 1 and "no such file" in out.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = run_cli("absorb", str(empty), "--out", str(tmp_path / "s"))
    assert out.returncode == 1 and "empty" in out.stderr
    assert not (tmp_path / "s").exists()
