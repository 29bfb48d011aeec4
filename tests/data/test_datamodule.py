"""MultimodalDataModule: in-memory, json and imagefolder sources; encoded (preprocessed) and raw paths give equal
batches; seeded shuffle; grouping; skipping; bad samples named at setup."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import soundfile
import torch
from datasets import Dataset

from cornstarch.data import DatasetSpec, MultimodalDataModule, SampleError
from cornstarch.data.packing import WithSupervisedPositions
from tests import tiny
from tests.data.test_collator import make


def rows(n: int, seed: int = 0, skew: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    answers = [" ".join(rng.choice(tiny.WORDS[4:20], size=int(rng.integers(1, 40 if skew and i % 4 == 0 else 3))))
               for i in range(n)]
    n_images = [i % 3 for i in range(n)]
    return {
        "messages": [[{"role": "user", "content": " ".join(["<image>"] * k) + " which digit ?"},
                      {"role": "assistant", "content": a}] for k, a in zip(n_images, answers)],
        "images": [tiny.pil_images(k, seed=i) for i, k in enumerate(n_images)],
    }


def test_in_memory_dataset_batches_feed_the_model():
    mllm, proc = make()
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(6)), val=Dataset.from_dict(rows(3, 1)), processor=proc,
                              batch_size=3)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    val = list(dm.val_dataloader())
    assert all({"answers", "prompt_input_ids", "prompt_attention_mask"} <= set(b) for b in val)
    for batch in batches + val:
        inputs = {k: v for k, v in batch.items() if k not in ("answers", "prompt_input_ids", "prompt_attention_mask")}
        assert torch.isfinite(mllm(**inputs).loss)


def test_json_with_image_and_audio_paths(tmp_path):
    mllm, proc = make(audio=True)
    lines = []
    for i in range(4):
        img = f"img{i}.png"
        tiny.pil_images(1, seed=i)[0].save(tmp_path / img)
        wav = f"clip{i}.wav"
        soundfile.write(tmp_path / wav, tiny.waveforms(1, seed=i)[0], tiny.AUDIO_RATE)
        lines.append({"prompt": "<image> <audio> which digit", "answer": "seven", "images": [img], "audios": [wav]})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    dm = MultimodalDataModule(train=DatasetSpec("json", data_files=str(tmp_path / "data.jsonl")), processor=proc,
                              batch_size=2, sampling_rate=tiny.AUDIO_RATE)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape[0] == 2 and batch["input_features"].shape[0] == 2
    assert torch.isfinite(mllm(**batch).loss)


def test_imagefolder_with_metadata(tmp_path):
    mllm, proc = make()
    meta = []
    for i in range(4):
        tiny.pil_images(1, seed=i)[0].save(tmp_path / f"{i}.png")
        meta.append({"file_name": f"{i}.png", "prompt": "<image> which digit ?", "answer": tiny.WORDS[20 + i]})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    dm = MultimodalDataModule(train=DatasetSpec("imagefolder", data_dir=str(tmp_path)), processor=proc, batch_size=4,
                              num_workers=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape[0] == 4
    assert torch.isfinite(mllm(**batch).loss)


def mixed_rows(n: int) -> dict:
    """Rows with 0-2 images and 0-1 audio clips, answers of varying length."""
    base = rows(n, skew=True)
    n_audio = [i % 2 for i in range(n)]
    for messages, k in zip(base["messages"], n_audio):
        messages[0]["content"] = "<audio> " * k + messages[0]["content"]
    base["audios"] = [tiny.waveforms(k, seed=i) for i, k in enumerate(n_audio)]
    return base


def assert_same_batches(loader_a, loader_b) -> None:
    for a, b in zip(loader_a, loader_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
            assert same, key
            assert not isinstance(a[key], torch.Tensor) or a[key].dtype == b[key].dtype, key


@pytest.mark.parametrize("split", ["train", "val", "predict"])
def test_encoded_batches_equal_raw_collation(split):
    """Encoding once at setup and padding per batch gives exactly the batches of collating raw samples."""
    _, proc = make(audio=True)
    data = Dataset.from_dict(mixed_rows(14))
    kwargs = {split: data, "processor": proc, "batch_size": 4, "eval_batch_size": 5, "group_by_length": True,
              "sampling_rate": tiny.AUDIO_RATE}
    encoded, raw = MultimodalDataModule(**kwargs), MultimodalDataModule(preprocess=False, **kwargs)
    encoded.setup(), raw.setup()
    loader = getattr(encoded, f"{split}_dataloader")()
    if split == "train":
        assert encoded.lengths["train"] == raw.lengths["train"]
        order = list(loader.sampler)
        assert order == list(getattr(raw, f"{split}_dataloader")().sampler) and order != sorted(order)
    else:
        order = list(range(len(data)))
    collate = raw.collator(split, generate=split == "predict")
    if split == "train":  # train batches also carry the positions the model computes logits at
        collate = WithSupervisedPositions(collate)
    size = loader.batch_size
    direct = [collate([{**data[i], "__index__": i} for i in order[k:k + size]]) for k in range(0, len(order), size)]
    assert_same_batches(loader, direct)
    raw_loader = getattr(raw, f"{split}_dataloader")()
    if split == "train":  # a train loader's next pass is the next epoch: the raw one catches up by one pass
        list(raw_loader)
    assert_same_batches(loader, raw_loader)


def test_bad_samples_are_named_at_setup():
    _, proc = make()
    data = rows(6)
    data["images"][4] = []  # its text still has a placeholder (4 % 3 = 1)
    dm = MultimodalDataModule(train=Dataset.from_dict(data), processor=proc)
    with pytest.raises(SampleError, match=r"Sample 4, field 'images': 1 <image> placeholder\(s\) .* but 0 item"):
        dm.setup()
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(6)), processor=proc, max_length=40)
    with pytest.raises(SampleError, match=r"Sample 2, field 'messages': \d+ tokens .* max_length=40"):
        dm.setup()


def order(seed: int) -> list[int]:
    _, proc = make()
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(8)), processor=proc, batch_size=8, seed=seed)
    loader = dm.train_dataloader()
    ids = next(iter(loader))["input_ids"]
    return [hash(tuple(r.tolist())) for r in ids]


def test_seeded_shuffle_is_reproducible():
    assert order(3) == order(3)
    assert order(3) != order(4)


def real_fraction(dm) -> float:
    real = total = 0
    for batch in dm.train_dataloader():
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return real / total


@pytest.mark.parametrize("preprocess", [True, False], ids=["encoded", "raw"])
def test_group_by_length_cuts_padding(preprocess):
    _, proc = make()
    data = Dataset.from_dict(rows(48, skew=True))
    plain = MultimodalDataModule(train=data, processor=proc, batch_size=4, preprocess=preprocess)
    grouped = MultimodalDataModule(train=data, processor=proc, batch_size=4, group_by_length=True,
                                   preprocess=preprocess)
    plain.setup(), grouped.setup()
    collate = grouped.collator("train")
    exact = [len(collate([{**data[i], "__index__": i}])["input_ids"][0]) for i in range(len(data))]
    assert grouped.lengths["train"] == exact, "estimated lengths are exact for fixed-size encoders"
    assert real_fraction(grouped) > real_fraction(plain) + 0.1


@pytest.mark.parametrize("preprocess", [True, False], ids=["encoded", "raw"])
def test_too_long_samples_are_skipped_at_setup_and_logged(caplog, preprocess):
    _, proc = make()
    data = Dataset.from_dict(rows(9))  # 0, 1 or 2 images: 2 images exceed 40 tokens
    dm = MultimodalDataModule(train=data, processor=proc, batch_size=4, max_length=40, on_too_long="skip",
                              preprocess=preprocess)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert dm.skipped["train"] == 3 and len(dm.datasets["train"]) == 6
    assert "skipped 3 of 9 samples longer than max_length=40" in caplog.text
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[1] <= 40


def test_missing_processor_and_missing_split_are_clear():
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(2)))
    with pytest.raises(ValueError, match="has no processor"):
        dm.train_dataloader()
    _, proc = make()
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(2)), processor=proc)
    with pytest.raises(ValueError, match=r"No val data: pass val=DatasetSpec"):
        dm.val_dataloader()


def test_large_encoded_splits_are_announced(caplog, monkeypatch):
    import cornstarch.data.encoded as encoded

    _, proc = make()
    monkeypatch.setattr(encoded, "ENCODED_WARN_BYTES", 6 * 3 * 32 * 32 * 4)  # less than 6 images' pixels
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(6)), processor=proc)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "train: the encoded samples will take about" in caplog.text and "preprocess=False" in caplog.text


def test_text_only_rows_encode_without_modality_columns():
    _, proc = make()
    data = Dataset.from_dict({"prompt": ["which digit ?", "what is this"], "answer": ["seven", "two three"]})
    dm = MultimodalDataModule(train=data, processor=proc, batch_size=2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "supervised_positions"}
    assert int((batch["labels"] != -100).sum()) > 0
