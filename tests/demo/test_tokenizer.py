"""The demo tokenizer: offline training, reload, determinism, exact decoding, the chat template and its cache."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from cornstarch.demo import CHAT_TEMPLATE, DIGIT_NAMES, VLM_QUESTION, demo_root, demo_tokenizer, tokenizer_corpus
from cornstarch.demo import tokenizer as tokenizer_module


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return demo_tokenizer(tok_dir)


def conversation(answer: str, question: str = VLM_QUESTION) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_tokenizer_builds_offline_and_reloads_identically(tmp_path, no_network):
    tok = demo_tokenizer(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == len(reloaded) == 600
    assert reloaded.get_vocab() == tok.get_vocab()
    assert reloaded.chat_template == CHAT_TEMPLATE
    special = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
    for role, text in special.items():
        assert getattr(reloaded, f"{role}_token") == text
        assert getattr(reloaded, f"{role}_token_id") == tok.convert_tokens_to_ids(text)
    for text in tokenizer_corpus()[::7]:
        assert reloaded(text).input_ids == tok(text).input_ids
    chat = conversation("seven")
    assert reloaded.apply_chat_template(chat) == tok.apply_chat_template(chat)


def test_tokenizer_training_is_deterministic(tmp_path, tok_dir, tok):
    again = demo_tokenizer(tmp_path / "again", overwrite=True)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert again.get_vocab() == tok.get_vocab()


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_tokenizer_decodes_any_text_back_exactly(tok, text):
    assume(not any(special in text for special in tok.all_special_tokens))  # "<unk>" in text is the unk token
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_digit_names_are_single_tokens(tok):
    ids = [tok(" " + name).input_ids for name in DIGIT_NAMES]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == 10


def test_chat_template_prompt_is_prefix_and_mask_covers_answer(tok):
    chat = conversation("seven")
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == "<s>USER: <image>\nWhich digit is this?\nASSISTANT: seven</s>\n"
    full = tok.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    prompt = tok.apply_chat_template(chat[:1], add_generation_prompt=True)["input_ids"]
    assert tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True).endswith("ASSISTANT:")
    assert full["input_ids"][:len(prompt)] == prompt
    answer = [i for i, m in zip(full["input_ids"], full["assistant_masks"]) if m]
    assert answer == tok(" seven").input_ids + [tok.eos_token_id]
    assert full["input_ids"][0] == tok.bos_token_id
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "hi"}])


def no_training(vocab_size):
    raise AssertionError("retrained although the cache is current")


def test_default_dir_is_the_cache_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CORNSTARCH_CACHE", str(tmp_path / "cache"))
    assert demo_root() == tmp_path / "cache"
    first = demo_tokenizer()
    assert (tmp_path / "cache" / "tokenizer" / "tokenizer.json").is_file()

    monkeypatch.setattr(tokenizer_module, "_train_tokenizer", no_training)
    assert demo_tokenizer().get_vocab() == first.get_vocab()
    with pytest.raises(AssertionError, match="retrained"):
        demo_tokenizer(overwrite=True)
    with pytest.raises(AssertionError, match="retrained"):  # another recipe: the stamp no longer matches
        demo_tokenizer(vocab_size=500)


def test_a_saved_tokenizer_is_reused_unchanged(tmp_path, monkeypatch, tok_dir, tok):
    """A second call on a directory holding the current tokenizer loads it without training or rewriting it."""
    saved = {path.name: path.read_bytes() for path in tok_dir.iterdir()}
    monkeypatch.setattr(tokenizer_module, "_train_tokenizer", no_training)
    again = demo_tokenizer(tok_dir)
    assert again.get_vocab() == tok.get_vocab()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()  # same merges too
    assert {path.name: path.read_bytes() for path in tok_dir.iterdir()} == saved
