"""The demo tokenizer: a 600-token byte-level BPE trained locally on first use, on the demo conversations plus
some generic English, and cached under :func:`~cornstarch.demo.cache.demo_root`."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

from .cache import demo_root
from .prompts import DIGIT_NAMES, VALM_QUESTION, VLM_QUESTION, _conversation

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "demo_tokenizer", "tokenizer_corpus"]

# The assistant turn is wrapped in {% generation %} so that `apply_chat_template(..., return_dict=True,
# return_assistant_tokens_mask=True)` marks exactly the answer (and its </s>) as supervised. The generation prompt
# is "ASSISTANT:" without the space: the space starts the answer token (" seven"), so a prompt's ids are a prefix of
# the full conversation's ids. Transformers renders with trim_blocks, which would eat a newline written right after
# a block tag, hence the {{ '\\n' }}.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT:{% generation %} {{ message['content'] }}{{ eos_token }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# Generic English, so that the tokenizer handles more than the demo prompts with reasonable pieces.
_GENERIC_TEXT = """\
The quick brown fox jumps over the lazy dog. A picture shows a small number written by hand.
Please describe the image and the sound in a few words. What is in this picture? What do you hear?
The answer is a single word. Count the objects and say how many there are. Is it a cat or a dog?
This model reads images, listens to audio and writes text. Each sample has a question and an answer.
Yes, no, maybe. Hello, how are you today? I am fine, thank you. Good morning and good night.
The phone plays two tones for every key that you press on the keypad. Listen to the tone again.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000. First, second, third, last. Left, right, up, down.
Colors: red, green, blue, black, white, gray, yellow. Shapes: a circle, a square, a line, a dot.
Training a language model takes data, time and patience; validation tells us when to stop.
"""


def tokenizer_corpus() -> list[str]:
    """Texts the demo tokenizer is trained on.

    Returns:
        Every demo conversation (the 10 answers of the vision task, the 100 of the vision + audio task), rendered
        with :data:`CHAT_TEMPLATE` (special tokens left out), followed by the lines of some generic English.

    >>> any("ASSISTANT: seven three" in text for text in tokenizer_corpus())
    True
    """
    conversations = [_conversation(VLM_QUESTION, name) for name in DIGIT_NAMES]
    conversations += [_conversation(VALM_QUESTION, f"{a} {b}") for a in DIGIT_NAMES for b in DIGIT_NAMES]
    rendered, _ = render_jinja_template(conversations, chat_template=CHAT_TEMPLATE, bos_token="", eos_token="")
    return rendered + _GENERIC_TEXT.splitlines()


def _train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=CHAT_TEMPLATE, **SPECIAL_TOKENS)


def _fingerprint(vocab_size: int) -> str:
    """Hash of everything the trained tokenizer depends on, to tell a stale cache from a current one."""
    recipe = [tokenizer_corpus(), vocab_size, CHAT_TEMPLATE, SPECIAL_TOKENS, tokenizers.__version__]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


_STAMP = "cornstarch_demo_tokenizer.json"


def _is_current(save_dir: Path, fingerprint: str) -> bool:
    try:
        return json.loads((save_dir / _STAMP).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def _save(tokenizer: PreTrainedTokenizerFast, save_dir: Path, fingerprint: str) -> None:
    """Save with its stamp. A new directory is filled under a temporary name and renamed into place, so concurrent
    builders (e.g. DDP ranks) never see half a tokenizer; the loser of a race drops its copy."""
    def fill(directory: Path) -> None:
        tokenizer.save_pretrained(directory)
        (directory / _STAMP).write_text(json.dumps({"fingerprint": fingerprint}))

    if save_dir.exists():
        fill(save_dir)
        return
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}-", dir=save_dir.parent))
    fill(tmp)
    try:
        os.replace(tmp, save_dir)
    except OSError:  # another process created save_dir meanwhile
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()


def demo_tokenizer(
    save_dir: str | os.PathLike | None = None, vocab_size: int = 600, overwrite: bool = False
) -> PreTrainedTokenizerFast:
    """The demo byte-level BPE tokenizer: trained locally (or reused) and saved where ``AutoTokenizer`` can load it.

    The tokenizer has ``<pad>``/``<s>``/``</s>``/``<unk>`` as pad/bos/eos/unk tokens (ids 0..3), adds no special
    tokens on plain encoding (the chat template writes ``<s>`` and ``</s>``), decodes any text back exactly (byte
    level: nothing is ever unknown), and encodes each digit name after a space as a single token. Training is
    deterministic; a directory already holding the tokenizer of the same recipe (corpus, ``vocab_size``, chat
    template, special tokens, ``tokenizers`` version) is reused as is.

    Args:
        save_dir: Where to save; default ``demo_root() / "tokenizer"``. Created if missing; an existing directory
            keeps its other files.
        vocab_size: Target vocabulary size, special tokens included.
        overwrite: Retrain even if ``save_dir`` already holds a current tokenizer.

    Returns:
        The tokenizer as loaded back from ``save_dir`` (the same object ``AutoTokenizer.from_pretrained(save_dir)``
        gives), with :data:`CHAT_TEMPLATE` as its chat template.

    Raises:
        OSError: ``save_dir`` cannot be created or written.

    >>> import tempfile; tok = demo_tokenizer(tempfile.mkdtemp())
    >>> tok.decode(tok(" seven").input_ids), len(tok(" seven").input_ids), tok.pad_token_id
    (' seven', 1, 0)
    """
    save_dir = Path(save_dir) if save_dir is not None else demo_root() / "tokenizer"
    fingerprint = _fingerprint(vocab_size)
    if overwrite or not _is_current(save_dir, fingerprint):
        _save(_train_tokenizer(vocab_size), save_dir, fingerprint)
    return AutoTokenizer.from_pretrained(save_dir)
