"""What every suite hands the runner: examples made of a context (documents absorbed one per
`absorb` call, or joined into the prompt) and questions with their acceptable answers; and the rule
that keeps evaluation documents out of training."""

from __future__ import annotations

from dataclasses import dataclass, field

from .corpora import split_of


@dataclass
class Question:
    text: str
    answers: list[str]  # any of them counts as right
    choices: list[str] = field(default_factory=list)  # when set, answered by ranking these
    info: dict = field(default_factory=dict)  # what the question is about, for the report


@dataclass
class Example:
    id: str
    documents: list[str]  # absorbed one per absorb call; joined by a blank line in the prompt
    questions: list[Question]

    @property
    def context(self) -> str:
        return "\n\n".join(self.documents)


def is_eval_document(doc_id: str) -> bool:
    """True for corpus documents that evaluation may use (the 'dev' and 'test' splits of
    genadapter.eval.corpora.split_of); training must skip them. The rule hashes the document id, so
    it needs no manifest and never changes."""
    return split_of(doc_id) != "train"
