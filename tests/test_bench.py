"""The benchmark: its measurements run on tiny sizes and do the work they claim to (speed itself is
never asserted: the figures are ratios reported by `genadapter bench`)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from genadapter import load
from genadapter.bench.kit import kv_bytes, timed_greedy
from genadapter.bench.memory import bench_memory, format_memory
from genadapter.bench.run import SIZES, bench_prompting
from genadapter.eval.prompts import chat_ids, chat_message
from genadapter.generation import SamplingParams, generate_ids

from .conftest import DOCUMENT, TEST_CHUNK, UMASK, assert_umask_modes, make_tiny_base


def test_timed_greedy_decodes_like_the_library(random_model):
    s = random_model.session()
    s.absorb(DOCUMENT)
    ids = random_model.tokenizer.encode("The chief engineer of the railway was")
    timing = timed_greedy(random_model, ids, s.state, 6)
    expected = list(generate_ids(random_model, ids, s.state, SamplingParams(max_new_tokens=6)))
    assert timing.tokens[: len(expected)] == expected and len(timing.tokens) == 6
    assert timing.ttft > 0 and timing.per_token > 0
    # The cache holds the prompt and every token but the last one decoded.
    assert timing.cache.get_seq_length() == len(ids) + 5
    per_token = random_model.kv_cache_bytes(1)
    assert kv_bytes(timing.cache) == per_token * (len(ids) + 5)


def test_prompting_comparison_reuses_a_prefix_that_gives_the_same_answer(model):
    row = bench_prompting(model, SIZES["quick"], 96)
    assert row["cached_matches_recompute"]
    assert 96 <= row["reused_prefix_tokens"] < row["prompt_tokens"]
    assert row["kv_cache_bytes"] == model.kv_cache_bytes(row["reused_prefix_tokens"])
    assert row["state_bytes"] == model.session().state.nbytes
    for method in ("adapter", "prompt", "prompt_cached"):
        assert row[method]["ttft_ms"] > 0 and row[method]["decode_tokens_per_s"] > 0


def test_bench_command_quick(tiny_folder, tmp_path):
    # Every part of the command on the small random Llama: what is checked is the report's
    # shape and consistency, which hold for any base (the default base takes 20 s more).
    out = subprocess.run(
        [sys.executable, "-m", "genadapter.cli", "bench", "--quick", "--base", str(tiny_folder)]
        + ["--out", str(tmp_path / "bench.json"), "--chunk-tokens", "64"],
        capture_output=True,
        text=True,
        timeout=600,
        umask=UMASK,
    )
    assert out.returncode == 0, out.stderr
    assert_umask_modes(tmp_path / "bench.json")
    for section in (
        "1. absorb",
        "2. decode",
        "3. against prompting",
        "4. batched",
        "5. library",
        "6. context memory",
    ):
        assert section in out.stdout
    r = json.loads((tmp_path / "bench.json").read_text())
    # absorb and the plain forward it is compared with ran over the same tokens
    assert r["absorb"]["tokens"] == r["absorb"]["forward_tokens"]
    assert abs(r["absorb"]["tokens"] - SIZES["quick"].absorb_chunks * 64) <= 2
    assert r["absorb"]["ratio"] > 0
    assert set(r["decode"]["ms_per_token"]) == {"state", "state_reference", "empty", "unwrapped"}
    assert [b["sessions"] for b in r["batch"]] == list(SIZES["quick"].batch_sizes)
    assert all(p["cached_matches_recompute"] for p in r["prompting"])
    assert r["machine"]["torch"] == torch.__version__
    # part 5: routed over the quick size's stored states against one state, all timings finite
    lib = r["library"]
    assert lib["states"] == SIZES["quick"].library_states and lib["k"] == 2
    for value in (*lib["ms_per_token"].values(), lib["routed_over_one_state"]):
        assert math.isfinite(value) and value > 0
    assert set(lib["ms_per_token"]) == {"routed", "one_state", "no_state"}
    # part 6: the quick size reads one chunk a turn; memories of one and four chunks
    mem = r["memory"]
    assert mem["budget"] == 64 and [row["tokens"] for row in mem["rows"]] == [64, 256]
    assert all(row["read_tokens"] == 64 and row["prompt"] for row in mem["rows"])


@pytest.fixture(scope="module")
def tiny_folder(model, tmp_path_factory):
    """A small random Llama (window 2048) with the default tokenizer, as a local folder."""
    return make_tiny_base(tmp_path_factory.mktemp("tiny"), model.tokenizer)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    """That Llama loaded: the memory part is fast on it."""
    return load(base=tiny_folder, device="cpu", chunk_tokens=TEST_CHUNK)


def test_memory_part_reports_consistent_numbers(tiny):
    budget, saved = TEST_CHUNK, tiny.memory_budget
    r = bench_memory(tiny, (64, 2240), budget, 3, 1)
    assert r["storage"] == "int8" and r["budget"] == budget and r["window"] == 2048
    # bytes: exact, from the storage layout (memory.py) and the base's shape
    layers, heads, dim = tiny.memory_shape
    b = r["bytes"]
    tokens, blocks, n = b["tokens"], b["blocks"], layers * heads
    assert tokens >= budget - 2 and blocks == -(-tokens // min(TEST_CHUNK, tiny.memory_block))
    # int8 keys and values, a float16 scale per key channel and block, one per value token
    assert b["bytes"]["int8"] == n * (2 * dim * tokens + 2 * dim * blocks + 2 * tokens)
    assert b["bytes"]["float"] == b["bytes"]["kv_cache"] == tiny.kv_cache_bytes(tokens)
    assert b["bytes"]["kv_cache_bf16"] == 2 * 2 * n * dim * tokens
    assert b["int8_over_bf16"] == b["bytes"]["int8"] / b["bytes"]["kv_cache_bf16"]
    assert b["float_over_kv_cache"] == 1.0
    assert b["bytes_per_token"]["kv_cache_bf16"] == 4 * n * dim
    # one row per size: the asked ones, the budget and 4x the budget, sorted
    rows = r["rows"]
    assert [row["tokens"] for row in rows] == [64, 4 * budget, 2240]
    bare = len(chat_ids(tiny.tokenizer, chat_message(r["question"])))
    for row in rows:
        assert abs(row["memory_tokens"] - row["tokens"]) <= 2
        # a turn reads what the question selects, never more than the budget
        assert row["read_tokens"] == min(budget, row["memory_tokens"])
        assert row["bare"]["prompt_tokens"] == bare
        for timing in (row["memory"], row["bare"], row["prompt"] or {}):
            for key in ("ttft_ms", "ms_per_token"):
                assert key not in timing or (math.isfinite(timing[key]) and timing[key] > 0)
        assert row["memory_over_bare"] > 0
    # past the budget the memory reads as much, so the layout decoded over is the same length
    assert rows[1]["memory"]["prompt_tokens"] == rows[2]["memory"]["prompt_tokens"]
    # within the window, prompting the same tokens (header, context, question) is as long as
    # the layout that reads them all; past it prompting cannot run
    first = rows[0]
    assert first["prompt"]["context_tokens"] == 64
    assert abs(first["prompt"]["prompt_tokens"] - first["memory"]["prompt_tokens"]) <= 2
    assert 64 <= first["prompt"]["reused_prefix_tokens"] < first["prompt"]["prompt_tokens"]
    assert rows[2]["prompt"] is None and rows[2]["memory_over_prompt_cached"] is None
    # the acceptance lines are the rows' own ratios
    acc = r["acceptance"]
    assert acc["int8_over_bf16"]["value"] == b["int8_over_bf16"]
    assert acc["int8_over_bf16"]["limit"] == 0.52
    decode = [row["memory_over_prompt_cached"] for row in rows[:2]]
    assert acc["decode_over_prompt_cached"]["value"] == max(decode)
    flat = rows[1]["memory"]["ms_per_token"] / rows[0]["memory"]["ms_per_token"]
    assert acc["cost_4x_budget_over_budget"]["value"] == flat
    assert all(isinstance(check["met"], bool) for check in acc.values())
    report = "\n".join(format_memory(r))
    assert "6. context memory" in report and "n/a" in report
    assert tiny.memory_budget == saved  # the model's own budget is left as it was
