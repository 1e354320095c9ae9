"""Image question-answering prompts: the one place that renders a conversation, for training, `mixllm ask`
and `/v1/chat/completions` alike.

A conversation is a system prompt plus (question, answer) turns; the image placeholder opens the first
question (LLaVA's ``"<image>\\n..."``). Rendering uses the tokenizer's chat template. For training,
:func:`encode_conversation` tokenizes it segment by segment so the labels are exact: every token is
``IGNORE_INDEX`` except each answer's tokens and the end-of-turn token that closes it (what the model must
learn to emit to stop). Labels are *not* shifted here: the loss shifts them once.

SmolLM2's template inserts a ~20-token default system prompt when none is given; :data:`SYSTEM_PROMPT`
replaces it with a short fixed one, paid by every sample.
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM_PROMPT = "Answer about the image in a few words."
"""The fixed system prompt of image QA (training and serving must use the same one)."""
IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt, image tokens, padding)."""


def chat_messages(turns: Sequence[tuple[str, str | None]], system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """(question, answer) turns -> chat-template messages; an answer of None ends the list at that question."""
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in turns:
        messages.append({"role": "user", "content": question})
        if answer is None:
            break
        messages.append({"role": "assistant", "content": answer})
    return messages


def render_messages(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """Chat-template text of ``messages``; plain ``role: content`` lines for a tokenizer without a template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def question_prompt(tokenizer, question: str, image_token: str | None, system: str | None = SYSTEM_PROMPT) -> str:
    """The inference prompt for one question (the image placeholder first, as in training)."""
    content = f"{image_token}\n{question}" if image_token else question
    return render_messages(tokenizer, chat_messages([(content, None)], system), add_generation_prompt=True)


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn (SmolLM2: ``<|im_end|>``, its eos)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end an answer with")
    return int(tokenizer.eos_token_id)


def encode_conversation(
    tokenizer, turns: Sequence[tuple[str, str]], system: str | None = SYSTEM_PROMPT
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a whole conversation (placeholders not yet expanded).

    The text between answers is tokenized as it is rendered at inference (each prompt segment is the
    difference of two renderings of the growing conversation); each answer is ``tokens(answer) + [eot]``.
    """
    if not turns:
        raise ValueError("a conversation needs at least one (question, answer) turn")
    eot = end_of_turn_id(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for k, (_, answer) in enumerate(turns):
        messages = chat_messages(turns[: k + 1], system)
        with_prompt = render_messages(tokenizer, messages[:-1], add_generation_prompt=True)
        if not with_prompt.startswith(rendered):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        segment = tokenizer(with_prompt[len(rendered):], add_special_tokens=False)["input_ids"]
        ids += segment
        labels += [IGNORE_INDEX] * len(segment)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eot]
        ids += answer_ids
        labels += answer_ids
        full = render_messages(tokenizer, messages, add_generation_prompt=False)
        closing = full[len(with_prompt):]
        if not closing.startswith(answer):
            raise ValueError("the chat template changed the answer text")
        # What the template puts after the answer: the end-of-turn token (already supervised) and
        # separators, which are context for the next turn but carry no loss.
        rest = closing[len(answer):]
        eot_text = tokenizer.convert_ids_to_tokens(eot)
        if rest.startswith(eot_text):
            rest = rest[len(eot_text):]
        if rest:
            tail = tokenizer(rest, add_special_tokens=False)["input_ids"]
            ids += tail
            labels += [IGNORE_INDEX] * len(tail)
        rendered = full
    return ids, labels
