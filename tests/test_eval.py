"""The evaluation harness: metrics against hand-computed numbers, deterministic data, prompts that
differ only in the context, every suite on a tiny limit through the runner, and the real CLI.

Corpus documents and WordNet come from the fixture tree of tests/corpus_fixture.py (conftest.py
points genadapter.eval.corpora at it), so these tests run the same on a machine without the Debian
packages."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from genadapter.base import load_base
from genadapter.eval import SUITES, corpora, is_eval_document, run_suites
from genadapter.eval import metrics as m
from genadapter.eval.closedbook import closedbook_examples
from genadapter.eval.completion import completion_documents
from genadapter.eval.corpora import split_of
from genadapter.eval.demonstrations import icl_examples
from genadapter.eval.fictional import long_example, qa_examples
from genadapter.eval.library_suite import CONDITIONS
from genadapter.eval.persona import persona_examples
from genadapter.eval.report import format_table, write_charts
from genadapter.eval.runner import (
    LIMITS,
    QA_INSTRUCTION,
    QA_SCORER,
    Scorer,
    chat_ids,
    chat_message,
    fit_context,
    run_questions,
)
from genadapter.eval.sft import SFTBaseline
from genadapter.generator import Generator
from genadapter.model import AdaptedModel

from .conftest import DOCUMENT, TEST_CHUNK, UMASK, assert_umask_modes, make_tiny_base

# -- metrics, checked by hand ----------------------------------------------------------------------


def test_normalize_answer():
    assert m.normalize_answer("  The Quick, brown fox!") == "quick brown fox"
    assert m.normalize_answer("An apple a day") == "apple day"


def test_token_f1_by_hand():
    # pred {cat, sat}, gold {cat, sat, down}: P = 1, R = 2/3, F1 = 2 * (2/3) / (5/3) = 0.8
    assert m.token_f1("The cat sat.", "cat sat down") == pytest.approx(0.8)
    # pred [red, red, blue], gold [red, green]: overlap 1, P = 1/3, R = 1/2, F1 = 0.4
    assert m.token_f1("red red blue", "red green") == pytest.approx(0.4)
    assert m.token_f1("nothing shared", "other words") == 0.0
    assert m.token_f1("", "") == 1.0 and m.token_f1("word", "the") == 0.0


def test_contains_match_on_word_boundaries():
    assert m.contains_match("It was founded in 1874.", "1874") == 1.0
    assert m.contains_match("in 18745", "1874") == 0.0
    assert m.contains_match("A blue HERON, I think", "the heron") == 1.0
    assert m.contains_match("Staelde", "Staelde Klemdae") == 0.0
    assert m.best_of(m.contains_match, "Klemdae led it", ["Staelde Klemdae", "Klemdae"]) == 1.0
    assert m.best_of(m.token_f1, "Staelde", ["Staelde Klemdae", "Ruth"]) == pytest.approx(2 / 3)


def test_label_match_takes_the_first_line_only():
    assert m.label_match("Output: Cold\nInput: warm", "cold") == 1.0
    assert m.label_match("\n  cold.", "cold") == 1.0
    assert m.label_match("The opposite is cold", "cold") == 0.0


def test_perplexity_and_recovered_fraction_by_hand():
    # NLL sums 2 and 4 over 1 and 3 tokens: exp(6 / 4)
    assert m.perplexity([2.0, 4.0], [1, 3]) == pytest.approx(math.exp(1.5))
    with pytest.raises(ValueError):
        m.perplexity([], [])
    assert m.recovered_fraction(base=0.1, prompt=0.5, adapter=0.2) == pytest.approx(0.25)
    # lower is better: perplexity 20 -> 10 by prompting, 15 by the adapter recovers half
    assert m.recovered_fraction(base=20.0, prompt=10.0, adapter=15.0) == pytest.approx(0.5)
    assert m.recovered_fraction(base=0.3, prompt=0.3, adapter=0.4) is None


# -- data ------------------------------------------------------------------------------------------


def test_generated_data_is_deterministic_and_answerable():
    a, b, c = qa_examples(4, 3, seed=5), qa_examples(4, 3, seed=5), qa_examples(4, 3, seed=6)
    assert a == b and a != c
    for example in a:
        assert len(example.questions) == 3
        for q in example.questions:  # every gold answer is stated in the document
            assert any(ans in example.context for ans in q.answers), q
    users = persona_examples(2, 4, seed=1)
    assert users == persona_examples(2, 4, seed=1) != persona_examples(2, 4, seed=2)
    for user in users:
        assert len(user.documents) >= 3  # several sessions
        assert all(q.answers[0] in user.context for q in user.questions)
    tasks = icl_examples(shots=8, queries=3, seed=0)
    assert tasks == icl_examples(shots=8, queries=3, seed=0)
    for task in tasks:
        lines = task.context.splitlines()
        shown = {line.removeprefix("Input: ") for line in lines if line.startswith("Input:")}
        outputs = {line.removeprefix("Output: ") for line in lines if line.startswith("Output:")}
        assert len(shown) == 8 and len(task.questions) == 3
        assert not shown & {q.text.split("\n")[0].removeprefix("Input: ") for q in task.questions}
        for q in task.questions:
            assert q.answers[0] in q.choices and len(set(q.choices)) == len(q.choices) >= 3
            if q.info["task"] in ("antonym", "irregular-verb"):  # distractors never shown
                assert not (set(q.choices) - set(q.answers)) & outputs


def test_long_context_example_spans_its_length(model):
    count = lambda t: len(model.tokenizer.encode(t))  # noqa: E731
    example = long_example(3000, 3, seed=0, count_tokens=count)
    assert 3000 <= count(example.context) < 3400
    for q in example.questions:
        document = example.documents[q.info["document"]]
        assert any(ans in document for ans in q.answers)
        after = "\n\n".join(example.documents[q.info["document"] + 1 :])
        assert q.info["tokens_after"] == pytest.approx(count(after) if after else 0, abs=40)


def test_eval_documents_are_kept_out_of_training(model):
    ids = [f"corpus:{i:05d}" for i in range(4000)]
    held_out = [i for i in ids if is_eval_document(i)]
    assert 0.07 < len(held_out) / len(ids) < 0.13  # dev 5% + test 5%
    assert all(split_of(i) in ("dev", "test") for i in held_out)
    docs = completion_documents(model.tokenizer, 3, 64, 16, seed=0)
    assert len(docs) == 3 and all(split_of(d.doc_id) == "test" for d in docs)
    assert len({d.doc_id.split(":")[0] for d in docs}) == 3  # spread over corpora
    assert all(len(d.target_ids) == 16 and 32 <= len(d.context_ids) <= 64 for d in docs)


def test_corpora_are_read_under_their_root(corpus_root, monkeypatch, tmp_path):
    assert corpora.available() == list(corpora.CORPORA)
    sorting = dict(corpora.documents("python-docs"))["python-docs:howto/sorting"]
    assert sorting == (corpus_root / corpora.PYTHON_DOCS / "howto/sorting.rst.txt").read_text()
    chapter = dict(corpora.documents("debian-reference", "test"))["debian-reference:ch16:000"]
    assert chapter.startswith("Chapter 16. Backups") and "scripts are not text" not in chapter
    entries = dict(corpora.documents("foldoc"))["foldoc:00000"].split("\n\n")
    assert "00-database-info" not in entries[0] and entries[2].startswith("   See also")
    # An empty root is a machine without the packages: the harness says what to install.
    monkeypatch.setenv(corpora.ROOT_ENV, str(tmp_path))
    assert corpora.available() == []
    with pytest.raises(FileNotFoundError, match="apt-get install python3-doc dict-foldoc"):
        completion_documents(None, 3, 64, 16, seed=0)
    with pytest.raises(FileNotFoundError, match="dict-gcide"):
        list(corpora.documents("gcide"))


# -- prompts ---------------------------------------------------------------------------------------


def test_prompts_differ_only_in_the_context(model):
    tok = model.tokenizer
    question, context = "Who founded Tavrell Glassworks?", DOCUMENT.strip()
    base = chat_ids(tok, chat_message(question, None, QA_INSTRUCTION))
    prompt = chat_ids(tok, chat_message(question, context, QA_INSTRUCTION))
    # The adapter and the base send the very same message; prompting inserts the context into it:
    # deleting one contiguous run of the prompt's tokens gives the base prompt...
    head = next(i for i, (a, b) in enumerate(zip(base, prompt)) if a != b)
    tail = next(i for i, (a, b) in enumerate(zip(base[::-1], prompt[::-1])) if a != b)
    assert head + tail >= len(base) and len(prompt) > len(base) + 100
    # ... and, as text, what was inserted is the context and a blank line, before the question.
    asked = f"{question} {QA_INSTRUCTION}"
    assert tok.decode(base).count(asked) == 1
    assert tok.decode(prompt) == tok.decode(base).replace(asked, f"{context}\n\n{asked}")
    # These are the ids Session.chat sends (the runner answers through Session.chat).
    message = chat_message(question, context, QA_INSTRUCTION)
    assert model.session()._fit_chat([{"role": "user", "content": message}], 0)[1] == prompt


def test_prompting_keeps_the_most_recent_context(model):
    tok = model.tokenizer
    question = "When was the line electrified?"
    need = len(chat_ids(tok, chat_message(question, None, QA_INSTRUCTION)))
    text, kept = fit_context(tok, DOCUMENT, question, QA_INSTRUCTION, budget=need + 40)
    assert 30 <= kept <= 40 and DOCUMENT.endswith(text)
    assert len(chat_ids(tok, chat_message(question, text, QA_INSTRUCTION))) <= need + 40
    whole, kept = fit_context(tok, DOCUMENT, question, QA_INSTRUCTION, budget=4000)
    assert whole == DOCUMENT and kept == len(tok.encode(DOCUMENT))
    with pytest.raises(ValueError, match="question alone"):
        fit_context(tok, DOCUMENT, question, QA_INSTRUCTION, budget=need - 1)


# -- suites through the runner ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_results(untrained_model, tmp_path_factory):
    """Every suite at the tiny limit on a small random Llama with the default tokenizer and a
    fresh generator: what these tests check is the suites' plumbing and that B = 0 changes
    nothing, which holds for any base (the default base takes 80 s here, this one a few).
    Behaviour of the real base: `prompted_results` below."""
    folder = make_tiny_base(tmp_path_factory.mktemp("tiny-base"), untrained_model.tokenizer)
    base = load_base(str(folder), device="cpu", dtype=torch.float32)
    model = AdaptedModel(base, Generator.for_base(base.model), chunk_tokens=TEST_CHUNK)
    return run_suites(model, SUITES, limit="tiny", seed=0, progress=False)


@pytest.fixture(scope="module")
def prompted_results(untrained_model):
    """completion and qa at the tiny limit on the default base (no SFT baseline)."""
    limits = replace(LIMITS["tiny"], sft_steps=0)
    return run_suites(untrained_model, ["completion", "qa"], limits, seed=0, progress=False)


def test_every_suite_runs_on_a_tiny_limit(tiny_results, tmp_path):
    assert set(tiny_results["suites"]) == set(SUITES)
    for rows in tiny_results["suites"].values():
        for row in rows:
            assert row["n"] > 0 and len(row["records"]) == row["n"]
            # every suite has prompting; the memory suites absorb into a memory
            assert "prompt" in row["methods"]
            assert {"adapter", "memory"} & set(row["methods"])
            for method in row["methods"].values():
                for metric in row["metrics"]:
                    value = method[metric]
                    if metric == "perplexity":
                        assert value >= 1.0
                    else:  # scores in [0, 1]; the vocab suite's term NLL is lower-is-better
                        assert 0.0 <= value <= 1.0 if row["higher_is_better"] else value >= 0.0
    # The table and the charts take every suite's rows (memory suites have no adapter column).
    table = format_table(tiny_results)
    assert all(f"\n{suite}" in table or table.startswith(suite) for suite in ("manydocs", "beyond"))
    assert len(write_charts(tiny_results, tmp_path)) >= len(SUITES)
    assert "sft" in tiny_results["suites"]["qa"][0]["methods"]
    sft = tiny_results["suites"]["qa"][0]["methods"]["sft"]
    assert sft["steps"] == LIMITS["tiny"].sft_steps and sft["train_seconds"] > 0
    json.dumps(tiny_results)  # JSON-ready


def test_untrained_generator_answers_exactly_like_the_base(tiny_results):
    # A fresh generator's B is zero: an absorbed session must be the base model, bit for bit.
    completion = tiny_results["suites"]["completion"][0]
    assert (
        completion["methods"]["adapter"]["perplexity"]
        == completion["methods"]["base"]["perplexity"]
    )
    for suite in ("qa", "longqa", "icl", "persona", "closedbook"):
        for row in tiny_results["suites"][suite]:
            for record in row["records"]:
                assert record["adapter"]["answer"] == record["base"]["answer"]
                # with a zero delta the adapter adds nothing to the memory either
                if "memory+adapter" in record:
                    assert record["memory+adapter"]["answer"] == record["memory"]["answer"]
                if "adapter (other doc)" in record:  # the control, under another's session
                    assert record["adapter (other doc)"]["answer"] == record["base"]["answer"]
    # Question-answering suites with several examples have the other-document controls (tiny
    # persona has one user).
    for suite in ("qa", "icl"):
        row = tiny_results["suites"][suite][0]
        assert {"adapter (other doc)", "memory (other doc)"} <= set(row["methods"]), suite
    assert "memory (other doc)" not in tiny_results["suites"]["closedbook"][0]["methods"]
    other = completion["methods"]["memory (other doc)"]["perplexity"]
    assert other != completion["methods"]["memory"]["perplexity"]  # another text was read
    # vocab: also every merge of the glossaries' states, and of their LoRAs run by PEFT on a
    # separate transformers base (all deltas zero).
    row = tiny_results["suites"]["vocab"][0]
    assert {"sum", "state ties", "lora ties", "memory", "memory+adapter"} <= set(row["methods"])
    for record in row["records"]:
        base = record["base"]
        for name in row["methods"]:
            if name not in ("prompt", "memory", "memory+adapter"):
                assert record[name]["answer"] == base["answer"], name
                assert record[name]["term_nll"] == pytest.approx(base["term_nll"], abs=1e-5)
        # the glossary's memory is read (its sentences score otherwise); B = 0 adds nothing
        assert record["memory"]["term_nll"] != base["term_nll"]
        assert record["memory+adapter"] == record["memory"]


def test_library_suite_rows_hold_every_condition(tiny_results):
    # eval/library_suite.py at tiny: a 2-document library (one corpus, one QA document). With
    # B = 0 every state and every routing is the base, bit for bit, and an entry's state adds
    # nothing to its memory; prompting and the memories differ.
    rows = tiny_results["suites"]["library"]
    assert [r["name"] for r in rows] == ["library N=2", "library qa N=2"]
    corpus, qa = rows
    assert list(qa["methods"]) == list(CONDITIONS)
    # a continuation has no question for the library's search: no "library" column
    assert list(corpus["methods"]) == [c for c in CONDITIONS if c != "library"]
    for row in rows:
        for record in row["records"]:
            for c in row["methods"]:
                if c not in ("prompt", "memory", "memory+adapter", "library"):
                    assert record[c] == record["base"], c
            assert record["memory+adapter"] == record["memory"]
        assert set(row["retrieval"]) == {"lexical", "internal", "behaviour"}
        assert row["decode"] is None  # not timed at tiny (bench/library.py is tested in test_bench)
    # the entry's memory is its document's text: it changes the continuation's likelihood
    (record,) = corpus["records"]
    assert record["memory"]["perplexity"] != record["base"]["perplexity"]


def test_closedbook_documents_are_unrelated_to_their_questions():
    examples = closedbook_examples(30, seed=4)
    assert examples == closedbook_examples(30, seed=4) != closedbook_examples(30, seed=5)
    assert len({e.questions[0].text for e in examples}) == len(examples) == 30
    for e in examples:
        assert len(e.documents) == 1 and len(e.questions) == 1
        # The absorbed document never holds the answer: only what the model knew can answer.
        assert not any(a.lower() in e.context.lower() for a in e.questions[0].answers if len(a) > 2)


def test_prompting_uses_the_context(prompted_results):
    completion = prompted_results["suites"]["completion"][0]["methods"]
    assert completion["prompt"]["perplexity"] < completion["base"]["perplexity"]
    records = [r for row in prompted_results["suites"]["qa"] for r in row["records"]]
    assert any(r["prompt"]["answer"] != r["base"]["answer"] for r in records)
    assert all(r["prompt_context_tokens"] >= r["context_tokens"] - 2 for r in records)


def test_adapter_answers_from_the_absorbed_state(random_model):
    # A generator with nonzero B: the absorbed state must change the answers.
    examples = qa_examples(1, 2, seed=3)
    scorer = Scorer(QA_SCORER, QA_INSTRUCTION, max_new_tokens=8)
    row = run_questions(random_model, examples, scorer, "qa", progress=False)
    assert any(r["adapter"]["answer"] != r["base"]["answer"] for r in row["records"])


def test_sft_baseline_fits_the_context_on_a_copy(model):
    before = {n: p.clone() for n, p in model.base.named_parameters()}
    sft = SFTBaseline(model, steps=2, lr=4e-3)
    ids = torch.tensor([model.tokenizer.encode(DOCUMENT)])
    loss = lambda: sft.model.base(input_ids=ids, labels=ids).loss.item()  # noqa: E731
    start = loss()
    assert sft.fit(DOCUMENT) > 0
    fitted = loss()
    assert fitted < start - 0.05
    for n, p in model.base.named_parameters():  # the shared model is untouched
        assert torch.equal(p, before[n])
    sft.fit(DOCUMENT)  # each fit starts from the same fresh LoRA: the same result again
    assert loss() == pytest.approx(fitted, rel=1e-4)


# -- the command line ------------------------------------------------------------------------------


def test_eval_command_writes_table_json_and_charts(tmp_path, capsys):
    from genadapter import cli

    # main() in this process (a new interpreter is 3-4 s of imports), under the tests' umask.
    argv = ["eval", *["--suite", "completion"] * 2, "--limit", "tiny", "--out", str(tmp_path)]
    argv += ["--memory-fraction", "0.5", "--memory-block", "64"]  # recorded in the config
    previous = os.umask(UMASK)
    try:
        assert cli.main(argv) == 0
    finally:
        os.umask(previous)
    out = capsys.readouterr()
    assert_umask_modes(tmp_path, include_root=False)  # results.json and the charts
    table = out.out.splitlines()
    assert "recovered" in table[0]
    # one row in the main table; the other-document controls in the suite's own table below it
    assert sum(line.startswith("completion ") and "perplexity" in line for line in table) == 1
    assert "memory (other doc)" in out.out
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["suites"]) == ["completion"]  # a suite named twice runs once
    assert results["config"]["limit"] == "tiny" and results["config"]["seconds"] > 0
    assert results["config"]["memory"] == {
        "storage": "int8",
        "budget": 1024,
        "fraction": 0.5,
        "block": 64,
    }
    # completion has methods of its own (the controls): one chart per headline metric
    chart = tmp_path / "completion-perplexity.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_command_rejects_bad_arguments(tmp_path):
    # Reported as a bad command line (exit 2) before the model loads.
    for bad, message in ((["--limit", "huge"], "unknown limit"), (["--suite", "nope"], "unknown")):
        out = subprocess.run(
            [sys.executable, "-m", "genadapter.cli", "eval", *bad, "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and "Loading weights" not in out.stderr
    assert not (tmp_path / "results.json").exists()
