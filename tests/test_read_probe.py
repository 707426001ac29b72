"""training/probes/read_probe.py: its held-out examples, and a short run that saves a loadable
generator with this stage's provenance."""

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "training" / "probes"), str(ROOT / "training")]
import read_probe  # noqa: E402

from genadapter.eval.fictional import qa_examples  # noqa: E402
from genadapter.eval.runner import LIMITS, QA_INSTRUCTION  # noqa: E402
from genadapter.generator import Generator  # noqa: E402


def test_word_answers_are_one_lower_case_word_of_the_document():
    for seed in range(50):
        ex = read_probe.word_example(random.Random(seed))
        assert ex.answer.isalpha() and ex.answer.islower() and ex.answer in ex.document


def test_eval_held_out_examples_come_from_the_evaluation_generator_not_its_test_set():
    test_documents = {  # what `genadapter eval` asks at each limit
        e.context
        for limit in LIMITS.values()
        for e in qa_examples(limit.qa_documents, limit.qa_questions, seed=0)
    }
    for seed in range(40):
        ex = read_probe.eval_example(random.Random(seed))
        assert ex.question.endswith(QA_INSTRUCTION) and ex.answer in ex.document
        assert ex.document not in test_documents
        assert ex == read_probe.eval_example(random.Random(seed))


def test_short_run_saves_a_generator_with_its_provenance(tmp_path):
    out = tmp_path / "probe"
    argv = ["--task", "word", "--steps", "2", "--eval-every", "5", "--held-out", "2"]
    argv += ["--batch", "1", "--held-out-task", "eval"]
    read_probe.main([*argv, "--out", str(tmp_path / "log.jsonl"), "--save", str(out)])
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2]  # and always the last step
    extra = Generator.from_pretrained(out, None).config.extra
    assert extra["steps"] == 2 and extra["tokens"] > 0 and extra["last_eval"] == rows[-1]
    assert extra["args"]["held_out_task"] == "eval"
