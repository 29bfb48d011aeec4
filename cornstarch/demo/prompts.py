"""The demo's text: the modality placeholders, the digit names, the two questions and the conversation layout."""

from __future__ import annotations

__all__ = ["AUDIO_PLACEHOLDER", "DIGIT_NAMES", "IMAGE_PLACEHOLDER", "VALM_QUESTION", "VLM_QUESTION"]

IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VLM_QUESTION = f"{IMAGE_PLACEHOLDER}\nWhich digit is this?"
VALM_QUESTION = f"{IMAGE_PLACEHOLDER}\n{AUDIO_PLACEHOLDER}\nWhich digits are shown and played?"


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    """One demo sample's ``messages``: the user asks ``question``, the assistant answers ``answer``.

    >>> _conversation(VLM_QUESTION, "seven")[1]
    {'role': 'assistant', 'content': 'seven'}
    """
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
