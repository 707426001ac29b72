"""Load benchmark of `genadapter serve`: generated tokens per second when N sessions chat at once
(their decode steps batched by the server) against the same requests sent one by one.

Starts a real server on loopback in its own process, makes N sessions that each absorb a
different document, then sends one chat per session: first sequentially, then all concurrently.
Every request is greedy and bounded (max_tokens), every wait has a timeout, and the server is
stopped at the end. Prints a Markdown table.

    .venv/bin/python benchmarks/serve_load.py --sessions 8 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "examples" / "data" / "lighthouse.md"
# Prompts that invite long answers, so most requests run to max_tokens in both modes.
QUESTIONS = [
    "Tell me everything this document says, in detail.",
    "Write a long story set in the place the document describes.",
    "Explain the history in the document step by step.",
    "Describe the people in the document at length.",
    "Write a detailed essay about the document.",
    "List every fact you know about the subject, one per line.",
    "Write a long letter to a friend about the document.",
    "Give a long, detailed summary of the document.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(args, store: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "genadapter.cli", "serve", "--port", str(port)]
    cmd += ["--store", str(store), "--max-batch", str(args.sessions)]
    for flag in ("base", "generator", "device"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    log = open(store / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server did not start:\n{(store / 'server.log').read_text()}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def documents(n: int) -> list[str]:
    """N different slices of the sample document, about 300 words each."""
    words = DOCUMENT.read_text(encoding="utf-8").split()
    step = max(1, (len(words) - 300) // max(1, n))
    return [" ".join(words[i * step : i * step + 300]) for i in range(n)]


def chat(client: httpx.Client, sid: str, question: str, max_tokens: int) -> tuple[int, float]:
    body = {
        "session_id": sid,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    start = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.perf_counter() - start


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp, server(args, Path(tmp)) as url:
        with httpx.Client(base_url=url, timeout=args.timeout) as client:
            sessions = []
            for doc in tqdm(documents(args.sessions), desc="sessions", leave=False):
                sid = client.post("/v1/sessions").json()["id"]
                client.post(f"/v1/sessions/{sid}/documents", json={"text": doc}).raise_for_status()
                sessions.append(sid)
            requests = [(s, QUESTIONS[i % len(QUESTIONS)]) for i, s in enumerate(sessions)]
            chat(client, sessions[0], "Hello", 4)  # warm-up: first forwards allocate

            start = time.perf_counter()
            one_by_one = [chat(client, s, q, args.max_tokens) for s, q in requests]
            sequential_s = time.perf_counter() - start

            before = client.get("/health").json()["batch"]
            start = time.perf_counter()
            with ThreadPoolExecutor(len(requests)) as pool:
                together = list(pool.map(lambda r: chat(client, *r, args.max_tokens), requests))
            concurrent_s = time.perf_counter() - start
            after = client.get("/health").json()["batch"]

    # Decode steps of the concurrent phase alone, and the rows (sessions) each one carried.
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["rows"] - before["rows"]
    batch = {"decode_steps": steps, "mean_rows": round(rows / max(steps, 1), 1)}
    batch["max_rows"] = after["max_rows"]

    seq_tokens, con_tokens = sum(t for t, _ in one_by_one), sum(t for t, _ in together)
    return {
        "sessions": args.sessions,
        "max_tokens": args.max_tokens,
        "sequential_tokens": seq_tokens,
        "sequential_s": round(sequential_s, 2),
        "sequential_tok_s": round(seq_tokens / sequential_s, 1),
        "sequential_latency_s": round(statistics.mean(s for _, s in one_by_one), 2),
        "concurrent_tokens": con_tokens,
        "concurrent_s": round(concurrent_s, 2),
        "concurrent_tok_s": round(con_tokens / concurrent_s, 1),
        "concurrent_latency_s": round(statistics.mean(s for _, s in together), 2),
        "speedup": round((con_tokens / concurrent_s) / (seq_tokens / sequential_s), 2),
        "server_batch": batch,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions (one chat each)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--base", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--generator", help="trained generator folder")
    p.add_argument("--device", help="cpu, cuda ...")
    p.add_argument("--timeout", type=float, default=600, help="seconds for any one wait")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    if not 1 <= args.sessions <= 256 or not 1 <= args.max_tokens <= 4096:
        p.error("--sessions must be in 1..256 and --max-tokens in 1..4096")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("| mode | requests | tokens | seconds | tokens/s | mean latency (s) |")
    print("|---|---|---|---|---|---|")
    for mode in ("sequential", "concurrent"):
        print(
            f"| {'one by one' if mode == 'sequential' else 'all at once'} | {args.sessions} | "
            f"{result[mode + '_tokens']} | {result[mode + '_s']} | {result[mode + '_tok_s']} | "
            f"{result[mode + '_latency_s']} |"
        )
    b = result["server_batch"]
    print(
        f"\nconcurrent / one by one: {result['speedup']}x tokens/s; server decode steps "
        f"{b['decode_steps']}, mean batch {b['mean_rows']}, largest {b['max_rows']} "
        f"(cpu count {os.cpu_count()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
