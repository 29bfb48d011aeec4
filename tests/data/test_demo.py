"""The offline demo data: tokenizer, digit images, DTMF tones, the two tasks and their files."""

from __future__ import annotations

import json
import socket
import time

import datasets
import numpy as np
import PIL.Image
import pytest
import soundfile
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from transformers import AutoTokenizer

from cornstarch.data import demo
from cornstarch.data.demo import DIGIT_NAMES, DTMF_FREQUENCIES

N_DIGITS = 1797


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return demo.build_tokenizer(tok_dir)


def conversation(answer: str, question: str = demo.VLM_QUESTION) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def peak_frequencies(signal: np.ndarray, sampling_rate: int) -> list[int]:
    """The two strongest spectral peaks, in Hz (1 Hz bins by zero-padding to one second), at least 50 Hz apart."""
    spectrum = np.abs(np.fft.rfft(signal, n=sampling_rate))
    first = int(np.argmax(spectrum))
    spectrum[max(first - 50, 0):first + 50] = 0
    return sorted([first, int(np.argmax(spectrum))])


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_builds_fast_offline_and_reloads_identically(tmp_path, no_network):
    start = time.perf_counter()
    tok = demo.build_tokenizer(tmp_path)
    assert time.perf_counter() - start < 2.0
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == len(reloaded) == 600
    assert reloaded.get_vocab() == tok.get_vocab()
    assert reloaded.chat_template == demo.CHAT_TEMPLATE
    special = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
    for role, text in special.items():
        assert getattr(reloaded, f"{role}_token") == text
        assert getattr(reloaded, f"{role}_token_id") == tok.convert_tokens_to_ids(text)
    for text in demo.tokenizer_corpus()[::7]:
        assert reloaded(text).input_ids == tok(text).input_ids
    chat = conversation("seven")
    assert reloaded.apply_chat_template(chat) == tok.apply_chat_template(chat)


def test_tokenizer_training_is_deterministic(tmp_path, tok_dir, tok):
    again = demo.build_tokenizer(tmp_path / "again", overwrite=True)
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


def test_default_dir_is_the_cache_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CORNSTARCH_CACHE", str(tmp_path / "cache"))
    assert demo.demo_root() == tmp_path / "cache"
    first = demo.build_tokenizer()
    assert (tmp_path / "cache" / "tokenizer" / "tokenizer.json").is_file()

    def no_training(vocab_size):
        raise AssertionError("retrained although the cache is current")

    monkeypatch.setattr(demo, "_train_tokenizer", no_training)
    assert demo.build_tokenizer().get_vocab() == first.get_vocab()
    with pytest.raises(AssertionError, match="retrained"):
        demo.build_tokenizer(overwrite=True)
    with pytest.raises(AssertionError, match="retrained"):  # another recipe: the stamp no longer matches
        demo.build_tokenizer(vocab_size=500)


def test_demo_root_default(monkeypatch):
    monkeypatch.delenv("CORNSTARCH_CACHE", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert str(demo.demo_root()) == "/home/someone/.cache/cornstarch"


# ----------------------------------------------------------------------------------------------------------------
# Images and tones


def test_digits_images_match_sklearn():
    images, labels = demo.digits_images(size=24)
    reference = load_digits()
    assert len(images) == N_DIGITS and labels.tolist() == reference.target.tolist()
    for k in (0, 5, 1000, N_DIGITS - 1):
        assert images[k].mode == "RGB" and images[k].size == (24, 24)
        rgb = pixels(images[k])
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
        expected = np.rint(reference.images[k] * 255 / 16).astype(np.uint8)
        assert (rgb[::3, ::3, 0] == expected).all()  # nearest upscaling by 3: every 3rd pixel is a source pixel
    smooth, _ = demo.digits_images(size=24, resample="bilinear")
    assert not (pixels(smooth[0]) == pixels(images[0])).all()
    with pytest.raises(ValueError, match="unknown resample 'blurry'"):
        demo.digits_images(resample="blurry")


@pytest.mark.parametrize("sampling_rate", [16000, 8000])
@pytest.mark.parametrize("seed", [None, 3])
def test_dtmf_spectrum_peaks_at_the_two_keypad_frequencies(sampling_rate, seed):
    for digit, frequencies in DTMF_FREQUENCIES.items():
        tone = demo.dtmf_tone(digit, sampling_rate=sampling_rate, seed=seed)
        assert tone.dtype == np.float32 and tone.shape == (sampling_rate // 4,)
        assert np.abs(tone).max() <= 1.0
        assert np.allclose(peak_frequencies(tone, sampling_rate), frequencies, atol=2)
    assert DTMF_FREQUENCIES[0] == (941, 1336)
    assert len(set(DTMF_FREQUENCIES.values())) == 10


def test_dtmf_seed_jitters_deterministically():
    clean = demo.dtmf_tone(5, duration=0.1)
    t = np.arange(1600) / 16000
    expected = 0.5 * np.sin(2 * np.pi * 770 * t) + 0.5 * np.sin(2 * np.pi * 1336 * t)
    assert np.allclose(clean, expected, atol=1e-6)
    a, b, c = (demo.dtmf_tone(5, duration=0.1, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.allclose(a, c) and not np.allclose(a, clean)


@pytest.mark.parametrize("digit", [10, -1, "7", 3.5])
def test_dtmf_rejects_non_digits(digit):
    with pytest.raises(ValueError, match="DTMF digit"):
        demo.dtmf_tone(digit)


def test_dtmf_rejects_too_low_sampling_rate():
    with pytest.raises(ValueError, match="Nyquist"):
        demo.dtmf_tone(1, sampling_rate=2954)


# ----------------------------------------------------------------------------------------------------------------
# Splits and datasets


def test_splits_are_disjoint_complete_and_seeded():
    train, val = demo.digits_split("train"), demo.digits_split("validation")
    assert len(val) == round(N_DIGITS * 0.2) and len(train) + len(val) == N_DIGITS
    assert not set(train) & set(val) and set(train) | set(val) == set(range(N_DIGITS))
    assert np.array_equal(val, demo.digits_split("validation")) and np.array_equal(val, demo.digits_split("val"))
    assert not np.array_equal(val, demo.digits_split("validation", seed=1))
    assert len(demo.digits_split("validation", val_fraction=0.5)) == round(N_DIGITS * 0.5)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        demo.digits_split("test")
    with pytest.raises(ValueError, match="val_fraction"):
        demo.digits_split("train", val_fraction=1.0)


@pytest.fixture(scope="module")
def vlm_val():
    return demo.digits_vlm_dataset("validation")


def test_vlm_rows_agree_with_the_source_digits(vlm_val):
    indices = demo.digits_split("validation")
    images, labels = demo.digits_images()
    assert len(vlm_val) == len(indices)
    assert vlm_val.features["label"].names == list(DIGIT_NAMES)
    assert vlm_val["label"] == labels[indices].tolist()
    for row, index in zip(vlm_val.select(range(0, len(vlm_val), 37)), indices[::37]):
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": "<image>\nWhich digit is this?"}
        assert assistant == {"role": "assistant", "content": DIGIT_NAMES[row["label"]]}
        assert user["content"].count(demo.IMAGE_PLACEHOLDER) == len(row["images"]) == 1
        assert (pixels(row["images"][0]) == pixels(images[index])).all()


def test_vlm_dataset_is_deterministic_and_n_takes_a_prefix(vlm_val):
    head = demo.digits_vlm_dataset("validation", n=5)
    assert len(head) == 5
    for a, b in zip(head, vlm_val.select(range(5))):
        assert a["messages"] == b["messages"] and a["label"] == b["label"]
        assert (pixels(a["images"][0]) == pixels(b["images"][0])).all()
    other = demo.digits_vlm_dataset("validation", seed=1, n=20, image_size=16)
    assert other[0]["images"][0].size == (16, 16)
    assert other["label"] != vlm_val["label"][:20]
    with pytest.raises(ValueError, match="n must be"):
        demo.digits_vlm_dataset("validation", n=-1)
    assert demo.digits_valm_dataset("validation", n=2).select_columns(["messages"])[0].keys() == {"messages"}


def test_vlm_train_and_validation_images_are_disjoint(vlm_val):
    train = demo.digits_vlm_dataset("train")
    assert len(train) + len(vlm_val) == N_DIGITS
    seen = {pixels(row["images"][0]).tobytes() for row in train}
    assert not any(pixels(row["images"][0]).tobytes() in seen for row in vlm_val)


@pytest.fixture(scope="module")
def valm_val():
    return demo.digits_valm_dataset("validation")


def test_valm_answer_names_image_digit_then_tone_digit(valm_val, vlm_val):
    assert valm_val["image_label"] == vlm_val["label"]
    for k in range(0, len(valm_val), 23):
        row = valm_val[k]
        user, assistant = row["messages"]
        assert user["content"] == "<image>\n<audio>\nWhich digits are shown and played?"
        assert assistant["content"] == f"{DIGIT_NAMES[row['image_label']]} {DIGIT_NAMES[row['audio_label']]}"
        assert (pixels(row["images"][0]) == pixels(vlm_val[k]["images"][0])).all()
        assert isinstance(row["audios"], list)
        (audio,) = row["audios"]
        assert audio.dtype == np.float32 and audio.shape == (4000,) and row["sampling_rate"] == 16000
        assert np.allclose(peak_frequencies(audio, 16000), DTMF_FREQUENCIES[row["audio_label"]], atol=2)


def test_valm_tone_digit_is_independent_of_the_image(valm_val):
    image, audio = np.array(valm_val["image_label"]), np.array(valm_val["audio_label"])
    assert set(audio.tolist()) == set(range(10))
    assert 0.03 < (image == audio).mean() < 0.2  # ~0.1 when independent; 1.0 if copied


def test_valm_dataset_is_deterministic():
    a, b = (demo.digits_valm_dataset("train", n=8, sampling_rate=8000, duration=0.1) for _ in range(2))
    assert a["messages"] == b["messages"]
    assert all(np.array_equal(x["audios"][0], y["audios"][0]) for x, y in zip(a, b))
    assert [(x.dtype, x.shape) for x in a[0]["audios"]] == [(np.float32, (800,))]
    shuffled = a.shuffle(seed=0).select([0])[0]  # the transform survives shuffle/select
    assert isinstance(shuffled["audios"][0], np.ndarray) and shuffled["audios"][0].dtype == np.float32


# ----------------------------------------------------------------------------------------------------------------
# Files


def test_written_files_load_back_offline(tmp_path, no_network):
    n = 12
    split_dir = demo.write_demo_files(tmp_path, split="validation", n=n)
    assert split_dir == tmp_path / "validation"
    expected_vlm = demo.digits_vlm_dataset("validation", n=n)
    expected_valm = demo.digits_valm_dataset("validation", n=n)
    cache = str(tmp_path / "hf-cache")

    data = datasets.load_dataset("json", data_files=str(split_dir / "data.jsonl"), split="train", cache_dir=cache)
    assert len(data) == n and data["messages"] == expected_valm["messages"]
    for row, expected in zip(data, expected_valm):
        assert row["image_label"] == expected["image_label"] and row["audio_label"] == expected["audio_label"]
        with PIL.Image.open(split_dir / row["images"][0]) as image:
            assert (pixels(image) == pixels(expected["images"][0])).all()
        audio, rate = soundfile.read(split_dir / row["audios"][0], dtype="float32")
        assert rate == row["sampling_rate"] == 16000 and np.array_equal(audio, expected["audios"][0])

    vision = datasets.load_dataset("json", data_files=str(split_dir / "vision.jsonl"), split="train",
                                   cache_dir=cache)
    assert vision["messages"] == expected_vlm["messages"] and vision["label"] == expected_vlm["label"]
    assert vision["images"] == data["images"]

    folder = datasets.load_dataset("imagefolder", data_dir=str(split_dir / "images"), split="train",
                                   cache_dir=cache)
    assert folder["messages"] == expected_vlm["messages"] and folder["label"] == expected_vlm["label"]
    for row, expected in zip(folder, expected_vlm):
        assert (pixels(row["image"]) == pixels(expected["images"][0])).all()
    metadata = [json.loads(line) for line in (split_dir / "images" / "metadata.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in metadata] == [f"{k:05d}.png" for k in range(n)]
