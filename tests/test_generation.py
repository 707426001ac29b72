"""Decoding on the real default base: answers cut inside a character, and the KV cache argument."""

import warnings

import pytest

from genadapter.generation import SamplingParams, generate_batch, generate_ids, stream_text

# The base continues this row with more emoji, each four bytes in three tokens.
EMOJI_PROMPT = "Emoji row: \U0001f600\U0001f600\U0001f600\U0001f600\U0001f600\U0001f600"


@pytest.fixture(scope="module")
def emoji_tokens(model):
    ids = model.tokenizer.encode(EMOJI_PROMPT, add_special_tokens=False)
    tokens = list(generate_ids(model, ids, None, SamplingParams(max_new_tokens=9)))
    assert len(tokens) == 9
    return tokens


def test_answer_cut_inside_a_character_drops_it(model, emoji_tokens):
    # session.generate is stream_text over generate_ids, whose first k tokens are the tokens of
    # max_new_tokens=k: every cut of the greedy answer, then the whole path once.
    tok = model.tokenizer
    full = "".join(stream_text(tok, iter(emoji_tokens), []))
    assert "\ufffd" not in full and full
    cut_inside = 0
    for k in range(1, len(emoji_tokens) + 1):
        cut_inside += tok.decode(emoji_tokens[:k]).endswith("\ufffd")
        pieces = list(stream_text(tok, iter(emoji_tokens[:k]), []))
        assert all(pieces) and "\ufffd" not in "".join(pieces)
        assert "".join(pieces) == tok.decode(emoji_tokens[:k]).removesuffix("\ufffd")
    assert cut_inside >= 4  # the generated tokens really split characters
    s = model.session()
    assert s.generate(EMOJI_PROMPT, max_new_tokens=4) == "\U0001f600"  # not "\U0001f600\ufffd"
    assert list(s.generate(EMOJI_PROMPT, max_new_tokens=5, stream=True)) == ["\U0001f600"]


def test_chat_answer_cut_inside_a_character_is_recorded_without_it(model):
    message = "Reply with three smiley emoji and nothing else: \U0001f600\U0001f600\U0001f600"
    s = model.session()
    answer = s.chat(message, max_new_tokens=5)  # the base's answer begins with two emoji
    assert answer == "\U0001f600" and s.messages[-1]["content"] == answer
    streamed = model.session()
    assert "".join(streamed.chat(message, max_new_tokens=5, stream=True)) == answer
    assert streamed.messages == s.messages


def test_stop_strings_still_apply_to_the_last_characters(model):
    ids = model.tokenizer.encode(" done \U0001f600 end", add_special_tokens=False)
    assert "".join(stream_text(model.tokenizer, iter(ids), ["end"])) == " done \U0001f600 "
    assert "".join(stream_text(model.tokenizer, iter(ids), ["\U0001f600"])) == " done "
    assert "".join(stream_text(model.tokenizer, iter(ids[:-2]), ["\U0001f600 "])) == " done "


def test_decoding_passes_the_kv_cache_without_deprecation_warnings(model):
    # transformers warns (FutureWarning) when the cache is passed as `past_key_values`; every
    # front end printed it in the middle of its first answer.
    ids = model.tokenizer.encode("The lighthouse stands on", add_special_tokens=False)
    state = model.session().state
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        single = list(generate_ids(model, ids, state, SamplingParams(max_new_tokens=3)))
        steps = list(generate_batch(model, [ids, ids], [state, None], [SamplingParams(3)] * 2))
    assert len(single) == 3
    assert [[t for i, t in step if i == 0] for step in steps] == [[t] for t in single]
