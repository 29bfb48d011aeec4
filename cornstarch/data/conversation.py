"""A sample's text as chat messages, rendered into prompt and answer segments (only answers are supervised)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .media import SampleError

PLAIN_USER = "USER: {content}\n"
PLAIN_ASSISTANT_PROMPT = "ASSISTANT: "
ROLES = ("system", "user", "assistant")


def to_messages(sample: dict[str, Any], index: Any, need_answer: bool = True) -> list[dict[str, str]]:
    """The sample's conversation: its ``messages``, or ``prompt`` (+ ``answer``) as one user/assistant turn.

    Raises:
        SampleError: for no text, no turns, an unknown role, a non-string content, an empty answer, or a
            conversation that starts with the assistant's answer (no prompt).

    >>> to_messages({"prompt": "<image> Which digit?", "answer": "seven"}, 0)[1]
    {'role': 'assistant', 'content': 'seven'}
    """
    if sample.get("messages") is not None:
        messages = [dict(m) for m in sample["messages"]]
        field = "messages"
    elif sample.get("prompt") is not None:
        messages = [{"role": "user", "content": sample["prompt"]}]
        if sample.get("answer") is not None or need_answer:
            messages.append({"role": "assistant", "content": sample.get("answer")})
        field = "answer"
    else:
        raise SampleError(index, "messages", "no text: give 'messages' or 'prompt'/'answer'.")
    for turn, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise SampleError(index, field, f"turn {turn} has role {message.get('role')!r}; roles: {', '.join(ROLES)}.")
        content = message.get("content")
        if not isinstance(content, str):
            raise SampleError(index, field, f"turn {turn} content must be a string, got {type(content).__name__}.")
        if message["role"] == "assistant" and not content.strip():
            raise SampleError(index, field, f"turn {turn}: the assistant's answer is empty.")
    if not messages:
        raise SampleError(index, field, "the conversation has no turns.")
    if messages[0]["role"] == "assistant":
        raise SampleError(index, field, "turn 0 is the assistant's: an answer needs a prompt before it (a user turn, "
                                        "holding the items' placeholders such as <image>).")
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise SampleError(index, field, "no assistant answer to learn from.")
    return messages


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if template:
        turns = tuple((m["role"], m["content"]) for m in messages)
        return _render_template(tokenizer, template, tokenizer.bos_token, tokenizer.eos_token, turns, generation_prompt)
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(f"{PLAIN_ASSISTANT_PROMPT}{m['content']}{tokenizer.eos_token or ''}\n")
        else:
            parts.append(PLAIN_USER.format(content=m["content"]))
    if generation_prompt:
        parts.append(PLAIN_ASSISTANT_PROMPT)
    return "".join(parts)


@lru_cache(maxsize=4096)
def _render_template(tokenizer: Any, template: str, bos: str | None, eos: str | None, turns: tuple[tuple[str, str], ...],
                     generation_prompt: bool) -> str:
    """The chat template's text for ``turns``, memoised: data sets repeat prompts (and often answers), and a Jinja
    render costs far more than the lookup. The template and special tokens are part of the key, so changing them
    on the tokenizer renders anew."""
    messages = [{"role": role, "content": content} for role, content in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_segments(tokenizer: Any, messages: list[dict[str, str]], index: Any,
                    generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """``(text, supervised)`` segments: prompts unsupervised, each assistant answer supervised.

    Uses the tokenizer's chat template when it has one, else ``USER: …\\nASSISTANT: …</s>``. An answer segment is
    the text the template adds for the assistant turn (content and end-of-turn marker). With
    ``generation_prompt``, a trailing assistant turn is dropped and the prompt ends ready for the answer.

    Raises:
        SampleError: if the chat template is not prefix-consistent (a turn rewrites earlier text).
    """
    if generation_prompt:
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return [(_render(tokenizer, messages, True), False)]
    segments: list[tuple[str, bool]] = []
    done = ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:turn], True)
        full = _render(tokenizer, messages[: turn + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise SampleError(index, "messages", "the chat template renders turns inconsistently; cannot find the answer.")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(text, supervised) for text, supervised in segments if text]
