"""Sessions: save/load, refusing foreign states and altered files, and bad input that changes
nothing; sessions and the model do not import each other."""

import ast
from pathlib import Path

import pytest
import torch

import genadapter
from genadapter import CorruptStateError, DocumentError, IncompatibleStateError, load
from genadapter.base import load_base
from genadapter.generator import Generator, GeneratorConfig, GeneratorFormatError
from genadapter.model import AdaptedModel

from .conftest import DOCUMENT, TEST_CHUNK, make_tiny_base


@pytest.fixture(scope="module")
def absorbed(random_model):
    s = random_model.session()
    s.absorb(DOCUMENT)
    s.chat("When was the line electrified?", max_new_tokens=8)
    return s


def test_save_load_round_trip_is_exact(random_model, absorbed, tmp_path):
    path = absorbed.save(tmp_path / "session")
    assert path == tmp_path / "session" / "state.safetensors"
    loaded = random_model.load_session(tmp_path / "session")
    for name, S in absorbed.state.sums.items():
        assert torch.equal(loaded.state.sums[name], S)
    assert (loaded.state.tokens, loaded.state.chunks, loaded.state.documents) == (
        absorbed.state.tokens,
        absorbed.state.chunks,
        absorbed.state.documents,
    )
    assert loaded.messages == absorbed.messages
    ids = torch.randint(3, 1000, (1, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        random_model.logits(ids, [loaded.state]), random_model.logits(ids, [absorbed.state])
    )


def test_state_of_another_generator_is_refused(model, absorbed, tmp_path):
    absorbed.save(tmp_path / "s")
    with pytest.raises(IncompatibleStateError, match="generator"):
        model.load_session(tmp_path / "s")  # same base, other generator weights


def test_state_of_another_base_is_refused(random_model, absorbed, tmp_path):
    folder = make_tiny_base(tmp_path / "tiny", random_model.tokenizer)
    tiny = load(base=folder, device="cpu", chunk_tokens=TEST_CHUNK)
    s = tiny.session()
    s.absorb(DOCUMENT)
    s.save(tmp_path / "tiny_session")
    with pytest.raises(IncompatibleStateError, match="base"):
        random_model.load_session(tmp_path / "tiny_session")
    absorbed.save(tmp_path / "big_session")
    with pytest.raises(IncompatibleStateError):
        tiny.load_session(tmp_path / "big_session")


def test_corrupt_or_missing_session_files_fail_clearly(random_model, absorbed, tmp_path):
    path = absorbed.save(tmp_path / "s")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptStateError):
        random_model.load_session(tmp_path / "s")
    with pytest.raises(FileNotFoundError):
        random_model.load_session(tmp_path / "nowhere")


def test_altered_session_metadata_is_refused(random_model, absorbed, tmp_path):
    path = absorbed.save(tmp_path / "s")
    data = path.read_bytes()
    digits = str(absorbed.tokens).encode()
    tokens = b'\\"tokens\\": ' + digits  # as the header's JSON escapes the metadata
    question = b"When was the line electrified?"
    assert data.count(tokens) == 1 and data.count(question) == 1
    edits = {
        # The count edited to 0, the header's length kept: loaded as an empty session before.
        "tokens 0": data.replace(tokens, tokens[: -len(digits)] + b"0").replace(
            b'}"', b" " * (len(digits) - 1) + b'}"', 1
        ),
        "bit in a count": data.replace(tokens, tokens[:-1] + bytes([tokens[-1] ^ 1])),
        "bit in the conversation": data.replace(question, question.replace(b"W", b"w")),
    }
    for what, altered in edits.items():
        assert len(altered) == len(data) and altered != data, what
        path.write_bytes(altered)
        with pytest.raises(CorruptStateError, match="checksum mismatch"):
            random_model.load_session(tmp_path / "s")


@pytest.mark.parametrize(
    "document",
    [
        "",
        "   \n",
        b"\xc3\x28 invalid utf-8",
        42,
        ["good text, then", None],
        "nul\x00byte",
        [b"caf\xc3"],  # ends in the middle of a character
        [b"caf\xc3", "\xa9 au lait"],  # a str piece cannot finish a character
    ],
)
def test_bad_documents_leave_state_unchanged(absorbed, document):
    before = absorbed.state.checksum(), absorbed.state.tokens, absorbed.state.documents
    with pytest.raises(DocumentError):
        absorbed.absorb(document)
    assert (absorbed.state.checksum(), absorbed.state.tokens, absorbed.state.documents) == before


def test_failure_mid_stream_leaves_state_unchanged(absorbed):
    # Many chunks are encoded before the bad piece arrives; none of them may land.
    before = absorbed.state.checksum(), absorbed.state.tokens
    with pytest.raises(DocumentError):
        absorbed.absorb(iter([DOCUMENT, DOCUMENT, b"\xff\xfe"]))
    assert (absorbed.state.checksum(), absorbed.state.tokens) == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": -1},
        {"max_new_tokens": 2.5},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"stop": [""]},
        {"max_new_tokens": 10**6},
    ],
)
def test_bad_generation_arguments_raise_and_change_nothing(absorbed, kwargs):
    before = absorbed.state.checksum(), list(absorbed.messages)
    with pytest.raises(ValueError):
        absorbed.generate("Hello", **kwargs)
    with pytest.raises(ValueError):
        absorbed.chat("Hello", **kwargs)
    assert (absorbed.state.checksum(), absorbed.messages) == before
    for prompt in ("", None):
        with pytest.raises(ValueError):
            absorbed.generate(prompt)


def test_generator_round_trip_and_malformed_checkpoints(random_model, tmp_path):
    gen = random_model.generator
    gen.save_pretrained(tmp_path / "gen", random_model.base_fingerprint)
    again = Generator.from_pretrained(tmp_path / "gen", random_model.base_fingerprint)
    assert again.fingerprint() == gen.fingerprint()
    with pytest.raises(GeneratorFormatError, match="trained for base"):
        Generator.from_pretrained(tmp_path / "gen", "another-base")
    (tmp_path / "gen" / "generator.safetensors").write_bytes(b"garbage")
    with pytest.raises(GeneratorFormatError, match="unreadable"):
        Generator.from_pretrained(tmp_path / "gen", None)
    (tmp_path / "gen" / "config.json").write_text("{not json")
    with pytest.raises(GeneratorFormatError, match="malformed"):
        Generator.from_pretrained(tmp_path / "gen", None)
    with pytest.raises(GeneratorFormatError, match="no config.json"):
        Generator.from_pretrained(tmp_path / "empty", None)


def test_generator_of_other_shape_is_refused(tmp_path):
    base = load_base(None, device="cpu", dtype=torch.float32)
    small = Generator.for_base(base.model, GeneratorConfig(r1=8, r2=8))
    small.save_pretrained(tmp_path / "gen", base.fingerprint)
    cfg = (tmp_path / "gen" / "config.json").read_text().replace('"r1": 8', '"r1": 16')
    (tmp_path / "gen" / "config.json").write_text(cfg)
    with pytest.raises(GeneratorFormatError, match="does not match"):
        Generator.from_pretrained(tmp_path / "gen", base.fingerprint)
    AdaptedModel(base, small)  # the unmodified small generator itself is fine


def test_base_fingerprint_does_not_depend_on_dtype(random_model):
    # A generator trained on a bfloat16 base must load onto the float32 base and back.
    bf16 = load_base(None, device="cpu", dtype=torch.bfloat16)
    assert bf16.fingerprint == random_model.base_fingerprint


def test_byte_pieces_may_split_a_character(random_model):
    joined = random_model.session()
    joined.absorb("caf\u00e9 au lait")
    pieces = random_model.session()
    pieces.absorb([b"caf\xc3", b"\xa9 au lait"])
    assert (pieces.state.tokens, pieces.state.chunks) == (joined.state.tokens, joined.state.chunks)
    for name, S in joined.state.sums.items():
        assert torch.equal(pieces.state.sums[name], S)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (also inside functions), by name."""
    modules = {
        ".".join(f.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): f
        for f in package.rglob("*.py")
    }
    graph = {}
    for name, file in modules.items():
        here = name if file.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.rsplit(".", node.level - 1)[0] if node.level else ""
                target = ".".join(p for p in (base, node.module or "") if p)
                names = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {n for n in names if n in modules and n != package.name}
    return graph


def test_model_and_session_import_one_way():
    graph = import_graph(Path(genadapter.__file__).parent)
    assert "genadapter.session" in graph["genadapter.model"]

    def reaches(start, goal):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return goal in seen

    for mod in ("model", "session", "state", "text", "generation"):
        assert not reaches(f"genadapter.{mod}", f"genadapter.{mod}"), f"{mod} is in an import cycle"
