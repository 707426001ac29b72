"""How much of each evaluation suite runs: the presets of `--limit` (tiny, small, full) and a
number's meaning (that many documents / users / questions per suite, with small's other
settings). Tests run every suite at `tiny`, so tiny stays a few seconds per suite. Imports nothing
heavy: the command line checks `--suite` and `--limit` against it before torch loads."""

from __future__ import annotations

from dataclasses import dataclass, replace

# The suites of `genadapter eval`, in the order they run (eval/runner.py's SUITE_FUNCTIONS).
SUITES = (
    "completion",
    "qa",
    "longqa",
    "icl",
    "persona",
    "closedbook",
    "vocab",
    "library",
    "manydocs",
    "beyond",
)
LORA_MERGES = ("mean", "task_arithmetic", "ties", "dare_linear", "dare_ties")  # the vocab suite's


@dataclass(frozen=True)
class Limits:
    """How much of each suite runs."""

    completion_documents: int
    completion_context: int  # tokens absorbed / put in the prompt
    completion_target: int  # tokens scored
    qa_documents: int
    qa_questions: int  # per document
    sft_steps: int
    longqa_lengths: tuple[int, ...]  # tokens of context in all
    longqa_questions: int  # per length
    icl_shots: int
    icl_queries: int  # per task
    persona_users: int
    persona_questions: int  # per user
    max_new_tokens: int  # for short answers
    closedbook_questions: int  # general questions, each with an unrelated document absorbed
    vocab_glossaries: int = 4  # glossaries of rare terms (at least 2, to merge)
    vocab_terms: int = 3  # per glossary
    vocab_merges: tuple[str, ...] = LORA_MERGES  # LoRA merge methods compared
    # The library suite (eval/library_suite.py): libraries of each size, nested.
    library_sizes: tuple[int, ...] = (8, 32, 128)  # documents in the library
    library_context: int = 512  # tokens absorbed per corpus document
    library_target: int = 128  # tokens of its continuation scored
    library_queries: int = 16  # documents per size scored under every condition
    library_new_tokens: int = 24  # answer tokens (QA) and tokens decoded for the timing
    # The beyond suite (eval/memory_suites.py): the window its stream is 3x of and prompting
    # keeps (None: the model's own; tiny uses a smaller one so tests stay fast).
    beyond_window: int | None = None
    beyond_questions: int = 8  # about documents in the stream's first third


LIMITS = {
    "tiny": Limits(
        # tiny is what the tests run: every suite and method once, not a measurement
        *(2, 128, 32, 2, 1, 2, (512,), 1, 4, 1, 1, 2, 8, 2, 2, 1, ("ties",)),
        library_sizes=(2,),
        library_context=32,
        library_target=12,
        library_queries=2,
        library_new_tokens=2,
        beyond_window=256,
        beyond_questions=1,
    ),
    "small": Limits(12, 1024, 256, 10, 3, 12, (2048, 8192, 32768), 2, 16, 8, 5, 4, 24, 30, 4, 3),
    "full": Limits(
        *(60, 4096, 256, 50, 4, 20, (2048, 8192, 32768), 10, 32, 25, 25, 6, 32, 30, 8, 6),
        library_context=1024,
        library_target=256,
        library_queries=48,
        library_new_tokens=32,
        beyond_questions=40,
    ),
}


def resolve_limits(limit: str | int | Limits) -> Limits:
    """A preset name, or an int: that many documents / users / questions per suite, with the
    'small' preset's other settings."""
    if isinstance(limit, Limits):
        return limit
    if isinstance(limit, str) and limit.isdigit():
        limit = int(limit)
    if isinstance(limit, int) and not isinstance(limit, bool):
        if limit < 1:
            raise ValueError("--limit must be a preset name or a positive number")
        return replace(
            LIMITS["small"],
            completion_documents=limit,
            qa_documents=limit,
            longqa_questions=limit,
            icl_queries=limit,
            persona_users=limit,
            closedbook_questions=limit,
            vocab_glossaries=max(2, limit),
            library_queries=limit,
            beyond_questions=max(2, 4 * limit),
        )
    if limit not in LIMITS:
        raise ValueError(f"unknown limit {limit!r}; use one of {', '.join(LIMITS)} or a number")
    return LIMITS[limit]
