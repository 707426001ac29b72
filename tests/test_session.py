"""Sessions: save/load, refusing foreign states, and bad input that changes nothing."""

import pytest
import torch

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


@pytest.mark.parametrize(
    "document",
    ["", "   \n", b"\xc3\x28 invalid utf-8", 42, ["good text, then", None], "nul\x00byte"],
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
