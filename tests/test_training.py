"""The training script on a small random Llama: exact resume (batches of two samples, periodic
evaluation with the harness included), and DDP over two CPU processes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import DOCUMENT, UMASK, assert_umask_modes, make_tiny_base

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))


@pytest.fixture(scope="module")
def setup(model, tmp_path_factory):
    from prepare_data import write_split

    tmp = tmp_path_factory.mktemp("train")
    base = make_tiny_base(tmp / "tiny", model.tokenizer, layers=2, hidden=32)
    ids = model.tokenizer.encode(DOCUMENT * 6, add_special_tokens=False)
    docs = [(f"doc{i}", ids[i * 50 :] + ids[: i * 50]) for i in range(6)]
    write_split(tmp / "data", "train", docs)
    write_split(tmp / "data", "dev", docs[:2])
    (tmp / "data" / "summary.json").write_text(json.dumps({"corpora": ["test"]}))
    return base, tmp / "data"


def train(out, base, data, *extra, nproc=1, fresh_process=True):
    """One run of training/train.py: in a fresh process (as a user runs it; DDP launches two),
    or in this one (`fresh_process=False`, for runs whose results the test only reads back from
    disk: it saves the interpreter's start and imports)."""
    args = [
        "--out_dir",
        str(out),
        "--base",
        str(base),
        "--data_dir",
        str(data),
        "--dtype",
        "float32",
        "--steps",
        "4",
        "--chunk_tokens",
        "64",
        "--context_min",
        "32",
        "--context_max",
        "160",
        "--target_tokens",
        "48",
        "--r1",
        "8",
        "--r2",
        "8",
        "--eval_interval",
        "100",
        "--eval_samples",
        "2",
        "--eval_qa_documents",
        "1",
        "--batch_size",
        "2",
        "--log_interval",
        "1",
        "--checkpoint_interval",
        "1",
        "--task_mix",
        '{"completion": 0.4, "reconstruction": 0.3, "qa": 0.3}',
        *extra,
    ]
    if not fresh_process:
        import train as train_script  # training/ is on sys.path (above)

        train_script.main(args)
        return None
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out_ = subprocess.run(
        [*launcher, str(ROOT / "training" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out_.returncode == 0, out_.stderr[-3000:]
    return out_


def weights(folder):
    return load_file(Path(folder) / "generator" / "generator.safetensors")


def test_resume_is_exact(setup, tmp_path):
    base, data = setup
    train(tmp_path / "straight", base, data, fresh_process=False)
    train(tmp_path / "resumed", base, data, "--stop_after", "2", fresh_process=False)
    lines = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    log = [json.loads(line) for line in lines]
    assert max(r["step"] for r in log) == 2  # really stopped half way
    train(tmp_path / "resumed", base, data)  # the resume is a fresh process, as after a crash
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    # Training moved the weights away from the fresh generator (B starts at zero).
    assert any(v.abs().max() > 0 for k, v in a.items() if k.endswith(".B"))
    config = json.loads((tmp_path / "straight" / "generator" / "config.json").read_text())
    assert config["config"]["extra"]["steps"] == 4
    # The periodic evaluation ran the harness's document-QA suite under every method.
    last_eval = config["config"]["extra"]["last_eval"]
    # dev completion and reconstruction, each with the wrong-document control (issue 24)
    for key in ("adapter", "adapter_other", "recon_adapter", "recon_other", "recon_base"):
        assert math.isfinite(last_eval[key]) and last_eval[key] > 0, key
    assert last_eval["own_minus_other"] == last_eval["adapter_other"] - last_eval["adapter"]
    for method in ("base", "prompt", "adapter"):
        assert 0 <= last_eval[f"qa_contains_{method}"] <= 1
        assert 0 <= last_eval[f"qa_f1_{method}"] <= 1


def test_ddp_with_two_cpu_processes(setup, tmp_path):
    base, data = setup
    out = train(tmp_path / "ddp", base, data, "--steps", "2", nproc=2)
    assert "all 2 ranks hold generator" in out.stderr + out.stdout
    assert (tmp_path / "ddp" / "generator" / "generator.safetensors").is_file()
    assert (tmp_path / "ddp" / "loss.png").is_file()


def test_continue_with_next_pairing_and_package(setup, tmp_path):
    base, data = setup
    train(tmp_path / "first", base, data, "--steps", "2", fresh_process=False)
    first = tmp_path / "first" / "generator"
    train(
        tmp_path / "second",
        base,
        data,
        "--steps",
        "1",
        "--init_from",
        str(first),
        "--pairing",
        "next",
        fresh_process=False,
    )
    second = tmp_path / "second" / "generator"
    assert json.loads((second / "config.json").read_text())["config"]["pairing"] == "next"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    packaged = tmp_path / "shipped"
    command = [
        sys.executable,
        str(ROOT / "training" / "package.py"),
        str(second),
        "--previous",
        str(first),
        "--eval",
        str(ROOT / "docs" / "eval" / "results.json"),
        "--out",
        str(packaged),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=env, umask=UMASK
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_umask_modes(packaged)  # the shipped generator is readable by every user
    meta = json.loads((packaged / "config.json").read_text())
    stages = meta["config"]["extra"]["stages"]
    assert [s["steps"] for s in stages] == [2, 1]  # oldest first
    assert stages[1]["train_config"]["init_from"] == str(first)
    qa = meta["config"]["extra"]["eval"]["rows"]["qa"]
    assert set(qa["methods"]) >= {"base", "prompt", "adapter"} and "contains" in qa["recovered"]
    # Packaging keeps the weights (bfloat16 both times) and the pairing.
    a, b = weights(tmp_path / "second"), load_file(packaged / "generator.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert meta["config"]["pairing"] == "next"


@pytest.mark.parametrize("kv_source", ["input", "residual"])
def test_training_builds_the_state_absorbing_builds(setup, model, kv_source):
    """The state a training step builds from a context (context_states, with its graph: chunks
    after the encoding prefix, padded to one batch) equals the state Session.absorb's pass builds
    for the same tokens (AdaptedModel.encode), so training sees what ships."""
    import torch
    from passes import Sample, context_states

    from genadapter.base import load_base
    from genadapter.generator import Generator, GeneratorConfig
    from genadapter.model import AdaptedModel

    base = load_base(str(setup[0]), device="cpu", dtype=torch.float32)
    config = GeneratorConfig(
        targets=("o_proj", "down_proj"), r1=8, r2=8, chunk_tokens=64, kv_source=kv_source
    )
    adapted = AdaptedModel(base, Generator.for_base(base.model, config))
    adapted.generator.requires_grad_(True)
    ids = model.tokenizer.encode(DOCUMENT, add_special_tokens=False)[:150]  # chunks 64, 64, 22
    assert len(adapted.encoding_prefix) > 0
    trained = context_states(adapted, [Sample("completion", ids, [], [])])
    absorbed = adapted.encode_chunks([ids[k : k + 64] for k in range(0, len(ids), 64)])
    assert trained.keys() == absorbed.sums.keys()
    for name, s in absorbed.sums.items():
        assert trained[name].requires_grad
        scale = s.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(trained[name][0].detach(), s, atol=1e-4 * scale, rtol=1e-4)


def test_complement_student_reading_everything_is_the_teacher(setup, model):
    """Stage 2's KL (complement.py): a student that reads the whole memory without an adapter
    computes what the teacher (the document in the prompt) does, so its KL is zero; a student
    reading one block of it does not."""
    import torch
    from complement import complement_loss
    from passes import Sample

    from genadapter.base import load_base
    from genadapter.generator import Generator, GeneratorConfig
    from genadapter.memory import encoding_prefix
    from genadapter.model import AdaptedModel

    base = load_base(str(setup[0]), device="cpu", dtype=torch.float32)
    config = GeneratorConfig(targets=("o_proj",), r1=8, r2=8, chunk_tokens=128)
    # Unquantized, one chunk: the memory read in full is the prompt (memory_read.py).
    adapted = AdaptedModel(base, Generator.for_base(base.model, config), memory="float")
    adapted.memory_block = 16
    ids = model.tokenizer.encode(DOCUMENT, add_special_tokens=False)
    header = encoding_prefix(model.tokenizer)
    whole = Sample("complement", ids[:100], ids[100:140], [], header=header, budget=100)
    one_block = Sample("complement", ids[:100], ids[100:140], [], header=header, budget=16)
    kl = complement_loss(adapted, [whole, one_block], None)
    assert kl.shape == (2,)
    assert abs(kl[0].item()) < 1e-6
    assert kl[1].item() > 1e-5  # a small random base: the context moves its outputs little


def test_complement_stage_trains(setup, tmp_path):
    """A stage-2 run (complement tasks only) trains the generator and reports, per budget, the
    memory alone against the memory with the adapter and with another document's adapter."""
    base, data = setup
    extra = ["--task_mix", '{"complement": 0.5, "complement_chat": 0.5}', "--steps", "2"]
    extra += ["--eval_qa_documents", "0", "--memory_block", "16", "--answer_tokens", "6"]
    train(tmp_path / "complement", base, data, *extra, fresh_process=False)
    a = weights(tmp_path / "complement")
    assert any(v.abs().max() > 0 for k, v in a.items() if k.endswith(".B"))
    rows = [json.loads(r) for r in (tmp_path / "complement" / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert any("complement" in r or "complement_chat" in r for r in train_rows)
    last = [r for r in rows if r["kind"] == "eval"][-1]
    for pct in (10, 25):
        for method in ("memory", "memory+adapter", "memory+other"):
            assert math.isfinite(last[f"b{pct}_{method}"]) and last[f"b{pct}_{method}_kl"] >= 0
            assert 0 <= last[f"b{pct}_qa_{method}"] <= 1
    assert math.isfinite(last["b_teacher"]) and math.isfinite(last["b_base"])
    assert last["base"] != last["b_base"]  # the stage-1 figures are still there, on other spans


def test_every_fact_question_of_the_training_chats_has_its_answer_in_the_document():
    """distill_sources: document-QA and a user's-facts items carry gold answers that their
    documents state (the complement stage's gate scores them); general questions carry none."""
    import random

    from distill_sources import general, persona, synth

    rng = random.Random(3)
    for source in (synth, persona):
        for _ in range(20):
            item = source(rng)
            assert item.answers and all(a in item.document for a in item.answers)
    assert general(rng).answers == []


def test_complement_teacher_answer_falls_back_to_the_gold_answer(setup, model):
    """complement.teacher_answer: a greedy answer that misses every gold answer is replaced by
    the first gold answer and the end of turn; without gold answers the greedy answer stays."""
    import torch
    from complement import teacher_answer

    from genadapter.base import load_base
    from genadapter.generator import Generator, GeneratorConfig
    from genadapter.model import AdaptedModel

    base = load_base(str(setup[0]), device="cpu", dtype=torch.float32)
    config = GeneratorConfig(targets=("o_proj",), r1=8, r2=8, chunk_tokens=128)
    adapted = AdaptedModel(base, Generator.for_base(base.model, config))
    tok = adapted.tokenizer
    ids = tok.encode("Who founded the guild? The answer:", add_special_tokens=False)
    free = teacher_answer(adapted, ids, [], 6)
    assert 1 <= len(free) <= 7
    gold = "Quorvath Ilinsk"  # a random tiny base does not write it
    forced = teacher_answer(adapted, ids, [gold], 6)
    assert forced == tok.encode(gold, add_special_tokens=False) + [tok.eos_token_id]
    written = tok.decode(free[:6], skip_special_tokens=True)
    assert written.strip()  # the seeded tiny base writes something; an answer it contains keeps it
    assert teacher_answer(adapted, ids, [written], 6) == free
