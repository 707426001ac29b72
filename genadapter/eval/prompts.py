"""The prompts of every method (one function builds them all, so they differ in the context
alone), and the seed rule that gives the dev split other generated examples than test."""

from __future__ import annotations

# Appended to every short-answer question, for every method.
QA_INSTRUCTION = "Answer in a few words."


def chat_message(question: str, context: str | None = None, instruction: str = "") -> str:
    """The user message of every method. Only prompting passes a context; it goes first, followed
    by a blank line, so the methods' prompts differ in the context and nothing else."""
    asked = f"{question} {instruction}" if instruction else question
    return f"{context}\n\n{asked}" if context else asked


def chat_ids(tokenizer, message: str) -> list[int]:
    """Token ids of a one-message conversation under the chat template, as Session.chat has it."""
    messages = [{"role": "user", "content": message}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def fit_context(
    tokenizer, context: str, question: str, instruction: str, budget: int, chat: bool = True
) -> tuple[str, int]:
    """The context as prompting sees it: whole if the message fits `budget` tokens, else only its
    most recent tokens (cut at a token boundary). Returns (text, tokens kept)."""
    ids = tokenizer.encode(context, add_special_tokens=False)
    keep = len(ids)
    while keep > 0:
        text = context if keep == len(ids) else tokenizer.decode(ids[-keep:])
        message = chat_message(question, text, instruction)
        excess = len(prompt_ids(tokenizer, message, chat)) - budget
        if excess <= 0:
            return text, keep
        keep -= excess
    raise ValueError(f"the question alone does not fit {budget} tokens")


def prompt_ids(tokenizer, message: str, chat: bool) -> list[int]:
    """The ids a message is sent as: under the chat template, or as raw text."""
    return chat_ids(tokenizer, message) if chat else tokenizer.encode(message)


def split_seed(seed: int, split: str) -> int:
    """Generated suites: the dev split (periodic evaluation in training) draws other examples."""
    return seed if split == "test" else seed + 1_000_003
