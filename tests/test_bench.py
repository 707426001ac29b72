"""The benchmark: its measurements run on tiny sizes and do the work they claim to (speed itself is
never asserted: the figures are ratios reported by `genadapter bench`)."""

import json
import math
import subprocess
import sys

import torch

from genadapter.bench import SIZES, bench_prompting, kv_bytes, timed_greedy
from genadapter.generation import SamplingParams, generate_ids

from .conftest import DOCUMENT


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
    assert row["state_bytes"] == model.session().nbytes
    for method in ("adapter", "prompt", "prompt_cached"):
        assert row[method]["ttft_ms"] > 0 and row[method]["decode_tokens_per_s"] > 0


def test_bench_command_quick(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "genadapter.cli", "bench", "--quick"]
        + ["--out", str(tmp_path / "bench.json"), "--chunk-tokens", "64"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    for section in ("1. absorb", "2. decode", "3. against prompting", "4. batched", "5. library"):
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
