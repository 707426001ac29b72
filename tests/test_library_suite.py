"""The `library` eval suite (eval/library_suite.py): true invariants only, on tiny sizes. The
suite itself runs at the tiny limit with every other suite in test_eval.py (tiny_results), which
checks its rows there; the routing decode benchmark (bench/library.py) runs as part 5 of
test_bench's quick `genadapter bench`."""

from genadapter.eval.library_suite import (
    CONDITIONS,
    ROUTED_K,
    _continuation_nll,
    first_sentences,
    library_documents,
)
from genadapter.library.folder import Library


def test_first_sentences_ends_at_a_sentence_after_enough_words():
    text = "one two. three four five six. seven eight nine ten eleven twelve. thirteen"
    assert first_sentences(text, least=3, most=60) == "one two. three four five six."
    assert first_sentences(text, least=1, most=60) == "one two."
    assert first_sentences(text, least=50, most=4) == "one two. three four"


def test_library_documents_mix_corpus_and_qa_documents_in_a_fixed_order(model):
    docs = library_documents(model.tokenizer, 6, 32, 12, seed=0, split="test")
    again = library_documents(model.tokenizer, 6, 32, 12, seed=0, split="test")
    assert [d.doc_id for d in docs] == [d.doc_id for d in again]
    assert [d.source == "qa" for d in docs] == [False, True, False, False, False, True]
    assert [d.name for d in docs] == [f"d{i:04d}" for i in range(6)]
    for d in docs:
        if d.source == "qa":
            assert d.question is not None and d.query == d.question.text and not d.target_ids
        else:
            assert len(d.target_ids) == 12 and 16 <= len(d.context_ids) <= 32
            assert d.query and d.query.split()[0] in model.tokenizer.decode(d.target_ids)


def test_routing_over_one_document_is_its_oracle_exactly(random_model, tmp_path):
    # One stored document: every routed k, the sum of all states and the oracle are one state;
    # the entry's memory is read by the memory conditions, with and without its state.
    doc = library_documents(random_model.tokenizer, 1, 32, 12, seed=0, split="test")[0]
    library = Library.create(tmp_path / "lib", random_model)
    library.add(doc.name, doc.absorbed)
    entry = library.load(doc.name)[0]
    oracle, memory = entry.state, entry.memory
    summed = random_model.new_state().add_(oracle)
    nll = {
        "base": _continuation_nll(random_model, doc, "base", None, None, None),
        "adapter": _continuation_nll(random_model, doc, "adapter", oracle, None, None),
        "sum": _continuation_nll(random_model, doc, "sum", summed, None, None),
    }
    for k in ROUTED_K:
        nll[f"routed k={k}"] = _continuation_nll(
            random_model, doc, f"routed k={k}", None, None, library.session(k)
        )
    both = _continuation_nll(random_model, doc, "memory+adapter", oracle, memory, None)
    alone = _continuation_nll(random_model, doc, "memory", None, memory, None)
    assert set(nll) | {"memory", "memory+adapter"} == set(CONDITIONS) - {"prompt", "library"}
    assert nll["base"] != nll["adapter"]  # the random generator's states change the scores
    for condition, value in nll.items():
        if condition != "base":
            assert value == nll["adapter"], condition
    # the memory reads the document's text; the state then changes what it gives
    assert alone != nll["base"] and both != alone
