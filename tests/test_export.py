"""PEFT export and merging (issue 15): an exported session is the same model under transformers +
PEFT and as a merged folder; `sum` of states is absorbing into one session; every merge method on
small examples whose results were worked out by hand (in the comments)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import genadapter
from genadapter import cli
from genadapter.adapters.export import LoraAdapter, export_session, session_lora
from genadapter.adapters.merging import METHODS
from genadapter.cli.adapters import MERGE_METHODS
from genadapter.memory import ContextMemory
from genadapter.session import Session
from genadapter.state import AdapterState

from .conftest import DOCUMENT, assert_umask_modes, usual_umask
from .memory_compare import assert_same_memory

OTHER = """The Harrowgate observatory stood on a granite knoll above the village of Tessel. Its
refractor, ground by Ilse Marwood in 1902, had a lens of 61 centimetres and was used until 1974
to time the transits of Jupiter's moons for the navy's almanac."""

TOL = 1e-4  # float32, the bound on logits
# The merged folder computes (W + B A) x where the session computes W x + B (A x): rounding the
# merged weights to float32 moves logits of up to ~20 by ~1e-4 at the worst of 3.5M (measured
# 1.3e-4 to 3.5e-4 with random generators), ~1e-5 on average.
MERGED_TOL, MERGED_MEAN_TOL = 5e-4, 3e-5


@pytest.fixture(scope="module")
def exported(random_model, tmp_path_factory):
    """A random-generator session over DOCUMENT, exported both ways."""
    session = random_model.session()
    session.absorb(DOCUMENT)
    out = tmp_path_factory.mktemp("export")
    with usual_umask():
        session.to_peft(out / "peft")
        session.to_peft(out / "merged", merged=True)
    return session, out


def test_exported_files_get_the_modes_the_umask_gives(exported):
    # Another user (a vLLM service) must be able to read what `export` writes (issue 25, item 4).
    _, out = exported
    assert_umask_modes(out / "peft")
    assert_umask_modes(out / "merged")


def _random_prompts(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(15)
    return torch.randint(0, vocab, (3, 24), generator=g)


def test_peft_adapter_on_the_transformers_base_gives_the_sessions_logits(
    exported, random_model, default_dir
):
    session, out = exported
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "o_proj"]
    assert config["base_model_name_or_path"] == str(default_dir)
    ids = _random_prompts(len(random_model.tokenizer))
    want = random_model.logits(ids, [session.state] * 3)
    base = random_model.logits(ids, None)
    assert (want - base).abs().max() > 0.1  # the delta matters, so the comparison can fail
    plain = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(plain, out / "peft").eval()
    with torch.no_grad():
        got = peft(input_ids=ids).logits.float()
    assert (got - want).abs().max() <= TOL


def test_merged_folder_gives_the_sessions_logits(exported, random_model, default_dir):
    session, out = exported
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    ids = _random_prompts(len(random_model.tokenizer))
    want = random_model.logits(ids, [session.state] * 3)
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits.float() - want).abs()
    assert diff.max() <= MERGED_TOL and diff.mean() <= MERGED_MEAN_TOL
    # The floor of any float32 merge: PEFT's own merge_and_unload of the exported adapter is as
    # far from the session (1.4e-4 measured, against 1.3e-4 for ours).
    plain = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    peft_merged = PeftModel.from_pretrained(plain, out / "peft").merge_and_unload().eval()
    with torch.no_grad():
        floor = (peft_merged(input_ids=ids).logits.float() - want).abs().max()
    assert diff.max() <= 1.5 * floor


def test_lora_folder_round_trip_and_empty_session(exported, random_model):
    session, out = exported
    lora = LoraAdapter.load(out / "peft")
    direct = session_lora(random_model, session.state)
    name = "model.layers.3.mlp.down_proj"
    assert torch.allclose(lora.delta(name), direct.delta(name), atol=1e-6)
    assert lora.info["tokens"] == session.tokens
    empty = session_lora(random_model, random_model.new_state())
    assert all(torch.count_nonzero(empty.delta(n)) == 0 for n in empty.weights)


def test_sum_of_states_is_absorbing_into_one_session(random_model, exported):
    a, _ = exported  # DOCUMENT absorbed
    b, both = random_model.session(), random_model.session()
    b.absorb(OTHER)
    both.absorb(DOCUMENT)
    both.absorb(OTHER)
    tokens = a.tokens
    merged = genadapter.merge([a, b], method="sum")
    assert merged.sums.keys() == both.state.sums.keys()
    assert all(torch.equal(merged.sums[n], both.state.sums[n]) for n in merged.sums)
    assert (merged.tokens, merged.documents) == (both.tokens, 2)
    assert a.tokens == tokens and merged.sums is not a.state.sums  # the inputs stay as they were


def test_merging_sessions_is_one_session_that_absorbed_both(random_model, exported):
    """State: the sum; memory: the union of the chunks, documents in the order given."""
    a, _ = exported  # DOCUMENT absorbed
    b, both = random_model.session(), random_model.session()
    b.absorb(OTHER)
    both.absorb(DOCUMENT)
    both.absorb(OTHER)
    chunks = len(a.memory.chunks)
    merged = genadapter.merge_sessions([a, b])
    assert isinstance(merged, Session) and merged.model is random_model and not merged.messages
    assert (merged.tokens, merged.state.documents) == (both.tokens, 2)
    for n, S in both.state.sums.items():
        assert (merged.state.sums[n] - S).norm() <= 1e-6 * S.norm(), n
    assert merged.memory_tokens == both.memory_tokens == both.tokens
    assert_same_memory(merged.memory, both.memory)  # each document was encoded on its own
    assert [c.document for c in merged.memory.chunks][chunks - 1 : chunks + 1] == [0, 1]
    assert len(a.memory.chunks) == chunks and a.memory.documents == 1  # inputs unchanged
    # The other order: b's chunks first.
    reverse = genadapter.merge_sessions([b, a])
    assert torch.equal(reverse.memory.chunks[0].keys, b.memory.chunks[0].keys)
    assert [c.document for c in reverse.memory.chunks] == [
        *(0 for _ in b.memory.chunks),
        *(1 for _ in a.memory.chunks),
    ]
    float_memory = Session(random_model, memory=ContextMemory(a.memory.prefix_len, "float"))
    with pytest.raises(ValueError, match="stored differently"):
        genadapter.merge_sessions([a, float_memory])
    with pytest.raises(ValueError):
        genadapter.merge_sessions([])


def test_exporting_says_the_memory_is_not_exported(exported, random_model, tmp_path, caplog):
    session, _ = exported
    tokens = session.memory_tokens
    assert tokens == session.tokens > 0
    with caplog.at_level(logging.WARNING, logger="genadapter.adapters.export"):
        path = export_session(session, tmp_path / "peft")
    notes = [r.getMessage() for r in caplog.records if "memory" in r.getMessage()]
    assert len(notes) == 1 and f"memory ({tokens} tokens" in notes[0], notes
    assert "cannot be expressed as a LoRA and is not exported" in notes[0]
    info = json.loads((path / "genadapter.json").read_text())
    assert info["memory_tokens_not_exported"] == tokens
    assert (
        LoraAdapter.load(path).weights.keys()
        == session_lora(random_model, session.state).weights.keys()
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="genadapter.adapters.export"):
        export_session(random_model.session(), tmp_path / "empty")  # an empty memory: no note
    assert not [r for r in caplog.records if "memory" in r.getMessage()]
    assert "memory_tokens_not_exported" not in json.loads(
        (tmp_path / "empty" / "genadapter.json").read_text()
    )


# -- hand-checked examples ------------------------------------------------------------------------

S1 = [[3.0, -1.0], [2.0, 0.5]]
S2 = [[1.0, 2.0], [-4.0, 0.25]]


def _states():
    return [AdapterState({"l": torch.tensor(s)}, tokens=5) for s in (S1, S2)]


@pytest.mark.parametrize(
    "method, kwargs, expected",
    [
        ("sum", {}, [[4.0, 1.0], [-2.0, 0.75]]),
        ("mean", {}, [[2.0, 0.5], [-1.0, 0.375]]),
        ("mean", {"weights": [3, 1]}, [[2.5, -0.25], [0.5, 0.4375]]),  # (3 S1 + S2) / 4
        ("task_arithmetic", {"weights": [2, 0.5]}, [[6.5, -1.0], [2.0, 1.125]]),
        # Trim to the 2 largest |.| of 4: S1 -> [[3,0],[2,0]], S2 -> [[0,2],[-4,0]]. Signs by the
        # total [[3,2],[-2,0]]: + + / - +. Agreeing entries averaged: 3, 2, -4 (S1's 2 disagrees),
        # and 0 where nothing is left.
        ("ties", {"density": 0.5}, [[3.0, 2.0], [-4.0, 0.0]]),
        # The same trim, then summed.
        ("magnitude_prune", {"density": 0.5}, [[3.0, 2.0], [-2.0, 0.0]]),
        # density 1 drops nothing: DARE is task arithmetic, DARE-TIES is TIES without the trim:
        # signs of S1 + S2 = [[4,1],[-2,.75]]; (3+1)/2, 2 (S2 alone), -4 (S2), (.5+.25)/2.
        ("dare_linear", {"density": 1.0}, [[4.0, 1.0], [-2.0, 0.75]]),
        ("dare_ties", {"density": 1.0}, [[2.0, 2.0], [-4.0, 0.375]]),
    ],
)
@pytest.mark.filterwarnings("ignore:The density")
def test_state_merge_methods_on_a_hand_checked_example(method, kwargs, expected):
    merged = genadapter.merge(_states(), method=method, **kwargs)
    assert torch.allclose(merged.sums["l"], torch.tensor(expected), atol=1e-6)
    assert merged.tokens == 10


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drops_at_random_and_rescales(method):
    """Every entry of a DARE-dropped S_i is 0 or S_i / density, so with density 0.5 each merged
    entry of two positive tensors is one of 0, 2a, 2b and 2a + 2b (DARE-TIES: their mean)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, 64, generator=g) + 1, torch.rand(64, 64, generator=g) + 1
    states = [AdapterState({"l": t}) for t in (a, b)]
    out = genadapter.merge(states, method=method, density=0.5, seed=3).sums["l"]
    both = 2 * a + 2 * b if method == "dare_linear" else a + b
    options = torch.stack([torch.zeros_like(a), 2 * a, 2 * b, both])
    assert ((out.unsqueeze(0) - options).abs().min(0).values < 1e-5).all()
    assert 0.2 < (out == 0).float().mean() < 0.3  # both dropped: 1/4 of the entries
    again = genadapter.merge(states, method=method, density=0.5, seed=3).sums["l"]
    assert torch.equal(out, again)


def test_lora_merges_on_a_hand_checked_example():
    # delta1 = [[3],[2]] [[1, 0]] = [[3, 0], [2, 0]]; delta2 = [[-1],[2]] [[1, 1]] = [[-1,-1],[2,2]]
    l1 = LoraAdapter({"m": (torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0], [2.0]]))})
    l2 = LoraAdapter({"m": (torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0], [2.0]]))})
    total = genadapter.merge([l1, l2], method="sum")
    assert total.rank == 2
    assert torch.allclose(total.delta("m"), torch.tensor([[2.0, -1.0], [4.0, 2.0]]), atol=1e-6)
    # TIES, density 0.5: delta1 keeps 3, 2; delta2 keeps its two 2s. Total signs all +: 3,
    # nothing at (0, 1), (2 + 2) / 2, 2.
    ties = genadapter.merge([l1, l2], method="ties", density=0.5)
    assert torch.allclose(ties.delta("m"), torch.tensor([[3.0, 0.0], [2.0, 2.0]]), atol=1e-5)
    weighted = genadapter.merge([l1, l2], method="task_arithmetic", weights=[1, -1])
    assert torch.allclose(weighted.delta("m"), torch.tensor([[4.0, 1.0], [0.0, -2.0]]), atol=1e-6)


def test_merge_refuses_bad_input():
    with pytest.raises(ValueError, match="method"):
        genadapter.merge(_states(), method="average")
    with pytest.raises(ValueError, match="no weights"):
        genadapter.merge(_states(), method="sum", weights=[1, 1])
    with pytest.raises(ValueError, match="weights"):
        genadapter.merge(_states(), method="mean", weights=[1])
    with pytest.raises(ValueError, match="density"):
        genadapter.merge(_states(), method="ties", density=0)
    lora = LoraAdapter({"l": (torch.ones(1, 2), torch.ones(2, 1))})
    with pytest.raises(ValueError, match="mix"):
        genadapter.merge([*_states(), lora])
    assert MERGE_METHODS == METHODS


def test_cli_merge_of_sessions_and_of_peft_folders(random_model, exported, tmp_path):
    a, b = random_model.session(), random_model.session()
    a.absorb(DOCUMENT)
    b.absorb(OTHER)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    argv = ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]
    assert cli.main(argv) == 0
    merged = random_model.load_session(tmp_path / "ab")
    expected = genadapter.merge_sessions([a, b])
    assert all(torch.equal(merged.state.sums[n], expected.state.sums[n]) for n in a.state.sums)
    assert merged.memory.documents == 2 and merged.memory_tokens == a.tokens + b.tokens
    assert_same_memory(merged.memory, expected.memory)  # the union of the saved memories
    _, out = exported
    peft = str(out / "peft")
    argv = ["merge", peft, peft, "--method", "mean", "--weights", "1", "3", "--out"]
    assert cli.main([*argv, str(tmp_path / "mean")]) == 0
    lora, one = LoraAdapter.load(tmp_path / "mean"), LoraAdapter.load(peft)
    assert lora.info["merge"] == "mean" and lora.rank == 2 * one.rank
    name = "model.layers.0.self_attn.o_proj"
    assert torch.allclose(lora.delta(name), one.delta(name), atol=1e-6)  # 1/4 + 3/4 of itself
    assert cli.main(["merge", peft, str(tmp_path / "a"), "--out", str(tmp_path / "x")]) == 2


def test_cli_export_writes_what_to_peft_writes(random_model, exported, tmp_path, capsys):
    session, out = exported
    random_model.generator.save_pretrained(tmp_path / "gen", random_model.base_fingerprint)
    session.save(tmp_path / "s")
    argv = ["export", str(tmp_path / "s"), "--generator", str(tmp_path / "gen")]
    assert cli.main([*argv, "--chunk-tokens", "64", "--peft", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert f"memory ({session.memory_tokens} tokens) cannot be expressed" in printed
    got, want = LoraAdapter.load(tmp_path / "p"), LoraAdapter.load(out / "peft")
    assert all(torch.equal(got.weights[n][0], want.weights[n][0]) for n in want.weights)
    assert cli.main(argv) == 2  # neither --peft nor --merged


def test_readme_peft_snippet_runs_as_written(exported, tmp_path, monkeypatch, capsys):
    """docs/EXPORT.md's transformers + PEFT block (fenced `py`: test_readme leaves it to this test),
    on this module's exported adapter placed where the snippet looks for it."""
    import re
    import shutil
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "EXPORT.md").read_text(encoding="utf-8")
    (snippet,) = [b for b in re.findall(r"^```py\n(.*?)^```", page, re.S | re.M) if "Peft" in b]
    _, out = exported
    shutil.copytree(out / "peft", tmp_path / "results" / "adapters" / "lighthouse")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "docs/EXPORT.md", "exec"), {})
    assert capsys.readouterr().out.strip()
