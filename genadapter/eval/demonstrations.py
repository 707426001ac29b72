"""Learning from demonstrations (the MetaICL analog): tasks shown only by k input/output pairs,
then new inputs to answer. Three tasks come from WordNet (Debian's `wordnet` package), one is
generated; without WordNet only the generated task runs, and a warning says so."""

from __future__ import annotations

import logging
import random
import re
from functools import lru_cache
from pathlib import Path

from . import corpora
from .data import Example, Question
from .fictional import NameMaker

log = logging.getLogger(__name__)
POS_FILES = {"noun": "noun", "verb": "verb", "adjective": "adj"}
# Words with at least this many senses seen in WordNet's sense-tagged corpus: common words.
MIN_TAGGED = 3
TASKS = ("antonym", "part-of-speech", "irregular-verb", "name-kind")


def _wordnet(name: str) -> Path:
    """One of WordNet's files (Debian's `wordnet` package), under genadapter.eval.corpora's root."""
    return corpora.path(corpora.WORDNET / name)


def wordnet_available() -> bool:
    return all(_wordnet(f).is_file() for f in ("index.adj", "data.adj", "verb.exc"))


def _plain(word: str) -> bool:
    return word.isalpha() and word.islower()


@lru_cache(maxsize=1)
def _tagged_counts() -> dict[str, dict[str, int]]:
    """POS -> lemma -> how many of the lemma's senses occur in WordNet's tagged corpus."""
    counts: dict[str, dict[str, int]] = {}
    for pos, suffix in POS_FILES.items():
        table = counts[pos] = {}
        for line in _wordnet(f"index.{suffix}").read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):
                continue  # license header
            f = line.split()
            pointers = int(f[3])
            table[f[0]] = int(f[5 + pointers])
    return counts


def _antonyms() -> list[tuple[str, str]]:
    """Common adjective pairs linked by WordNet's antonym pointer ('!')."""
    words_at: dict[str, list[str]] = {}
    links = []
    for line in _wordnet("data.adj").read_text(encoding="utf-8").splitlines():
        if line.startswith(" "):
            continue
        f = line.split(" | ")[0].split()
        offset, n_words = f[0], int(f[3], 16)
        words = [re.sub(r"\(.*\)$", "", w) for w in f[4 : 4 + 2 * n_words : 2]]
        words_at[offset] = words
        at = 4 + 2 * n_words
        for p in range(int(f[at])):
            symbol, target, _, st = f[at + 1 + 4 * p : at + 5 + 4 * p]
            if symbol == "!":
                links.append((words[int(st[:2], 16) - 1], target, int(st[2:], 16) - 1))
    tagged = _tagged_counts()["adjective"]
    pairs = {(w, words_at[t][i]) for w, t, i in links}
    return sorted(
        (a, b)
        for a, b in pairs
        if _plain(a) and _plain(b) and min(tagged.get(a, 0), tagged.get(b, 0)) >= MIN_TAGGED
    )


def _parts_of_speech() -> list[tuple[str, str]]:
    """Common words that are only ever one of noun, verb, adjective (and never an adverb)."""
    tagged = _tagged_counts()
    adverbs = {
        line.split()[0]
        for line in _wordnet("index.adv").read_text(encoding="utf-8").splitlines()
        if not line.startswith(" ")
    }
    pairs = []
    for pos, table in tagged.items():
        others = [t for p, t in tagged.items() if p != pos]
        for word, n in table.items():
            if n >= MIN_TAGGED and _plain(word) and word not in adverbs:
                if not any(word in t for t in others):
                    pairs.append((word, pos))
    return sorted(pairs)


def _irregular_verbs() -> list[tuple[str, str]]:
    """Irregular inflections -> base form, e.g. went -> go (WordNet's verb exception list)."""
    tagged = _tagged_counts()["verb"]
    pairs = []
    for line in _wordnet("verb.exc").read_text(encoding="utf-8").splitlines():
        form, base = line.split()[:2]
        shared = len(_common_prefix(form, base))
        if _plain(form) and _plain(base) and shared < len(base) - 1:
            if tagged.get(base, 0) >= MIN_TAGGED:
                pairs.append((form, base))
    return sorted(pairs)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _name_kinds(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Invented names labelled person / place / company: learnable only from the examples."""
    names = NameMaker(rng)
    makers = {"person": names.person, "place": names.place, "company": names.firm}
    kinds = list(makers)
    return [(makers[k](), k) for k in (kinds[i % 3] for i in range(n))]


def task_pairs(task: str, rng: random.Random, n: int) -> list[tuple[str, list[str]]]:
    """n (input, acceptable outputs) of a task, no input twice; the first output is the one a
    demonstration shows."""
    if task == "name-kind":
        pairs = _name_kinds(rng, n)
        rng.shuffle(pairs)
        return [(x, [y]) for x, y in pairs]
    pool = {
        "antonym": _antonyms,
        "part-of-speech": _parts_of_speech,
        "irregular-verb": _irregular_verbs,
    }[task]()
    if task == "part-of-speech":  # balanced labels
        by_label: dict[str, list] = {}
        for pair in pool:
            by_label.setdefault(pair[1], []).append(pair)
        labels = sorted(by_label)
        picks = [rng.sample(by_label[lab], n // len(labels) + 1) for lab in labels]
        pool = [p for group in zip(*picks) for p in group][:n]
        rng.shuffle(pool)
        return [(x, [y]) for x, y in pool]
    outputs: dict[str, list[str]] = {}
    for x, y in pool:  # an input with several right outputs (light -> dark, heavy) keeps them all
        outputs.setdefault(x, []).append(y)
    inputs = rng.sample(sorted(outputs), min(n, len(outputs)))
    return [(x, rng.sample(outputs[x], len(outputs[x]))) for x in inputs]


def demonstration_text(pairs: list[tuple[str, list[str]]]) -> str:
    return "\n\n".join(f"Input: {x}\nOutput: {ys[0]}" for x, ys in pairs)


LABELS = {
    "part-of-speech": ["noun", "verb", "adjective"],
    "name-kind": ["person", "place", "company"],
}
DISTRACTORS = 3  # wrong outputs ranked beside the right one in open-ended tasks
SPARE = 8  # inputs drawn beyond the queries, whose outputs serve as distractors


def icl_examples(shots: int, queries: int, seed: int) -> list[Example]:
    """One example per task: the k demonstrations are the context, new inputs the questions.
    Each question is answered by ranking choices (MetaICL's way): the task's labels, or the right
    output and outputs of other inputs of the same task."""
    tasks = TASKS if wordnet_available() else ("name-kind",)
    if len(tasks) < len(TASKS):
        log.warning(
            "WordNet is not installed (apt-get install wordnet): learning from demonstrations "
            "runs only the generated task"
        )
    examples = []
    for task in tasks:
        rng = random.Random(f"icl:{seed}:{task}")
        pairs = task_pairs(task, rng, shots + queries + SPARE)
        demos, tests = pairs[:shots], pairs[shots : shots + queries]
        # Wrong outputs never come from the demonstrations: a model copies what its context
        # shows, which would favour a distractor seen there over the right answer.
        shown = {y for _, ys in demos for y in ys}
        outputs = sorted({ys[0] for _, ys in pairs[shots:]} - shown)
        questions = []
        for x, ys in tests:
            if task in LABELS:
                choices = LABELS[task]
            else:
                wrong = [y for y in outputs if y not in ys]
                choices = rng.sample(wrong, min(DISTRACTORS, len(wrong))) + [ys[0]]
                rng.shuffle(choices)
            questions.append(Question(f"Input: {x}\nOutput:", ys, choices, info={"task": task}))
        examples.append(Example(f"icl-{seed}-{task}", [demonstration_text(demos)], questions))
    return examples
