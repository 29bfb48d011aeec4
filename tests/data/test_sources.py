"""Sources of a split: json with image and audio paths, imagefolder with metadata, a ``"module:function"``."""

from __future__ import annotations

import json
import os

import soundfile
import torch
from datasets import Dataset

from PIL import Image

from cornstarch.data import DatasetSpec, MultimodalDataModule
from cornstarch.data.sources import load_split, media_dir
from tests import tiny
from tests.data.test_collator import make


def items_from_files(batches: list[dict], key: str, expected: list[torch.Tensor]) -> list[int]:
    """The file each batch item's tensor equals exactly (in batch order), failing if one matches no file."""
    found = []
    for batch in batches:
        for item in batch[key]:
            matches = [i for i, want in enumerate(expected) if torch.equal(item, want)]
            assert len(matches) == 1, f"a {key} item equals {len(matches)} of the files"
            found += matches
    return found


def supervised_text(batch: dict, tokenizer) -> list[str]:
    return [tokenizer.decode(row[row != -100], skip_special_tokens=True).strip() for row in batch["labels"]]


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
    batches = list(dm.train_dataloader())
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 2]
    # the loaded pixels and features are those of the files, each file once, image i with clip i
    image_processor, audio_processor = proc.encoder_processors["vision"], proc.encoder_processors["audio"]
    pixels = [image_processor(Image.open(tmp_path / f"img{i}.png"), return_tensors="pt")["pixel_values"][0]
              for i in range(4)]
    features = [audio_processor(soundfile.read(tmp_path / f"clip{i}.wav", dtype="float32")[0],
                                sampling_rate=tiny.AUDIO_RATE, return_tensors="pt")["input_features"][0]
                for i in range(4)]
    images = items_from_files(batches, "pixel_values", pixels)
    assert sorted(images) == [0, 1, 2, 3]
    assert items_from_files(batches, "input_features", features) == images
    assert torch.isfinite(mllm(**batches[0]).loss)


def test_imagefolder_with_metadata(tmp_path):
    mllm, proc = make()
    meta = []
    for i in range(4):
        tiny.pil_images(1, seed=i)[0].save(tmp_path / f"{i}.png")
        meta.append({"file_name": f"{i}.png", "prompt": "<image> which digit ?", "answer": tiny.WORDS[20 + i]})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    dm = MultimodalDataModule(train=DatasetSpec("imagefolder", data_dir=str(tmp_path)), processor=proc, batch_size=4,
                              num_workers=2)
    (batch,) = list(dm.train_dataloader())
    pixels = [proc.encoder_processors["vision"](Image.open(tmp_path / f"{i}.png"), return_tensors="pt")["pixel_values"][0]
              for i in range(4)]
    images = items_from_files([batch], "pixel_values", pixels)
    assert sorted(images) == [0, 1, 2, 3]
    # each image's sample carries its own metadata row's answer
    assert supervised_text(batch, proc.tokenizer) == [tiny.WORDS[20 + i] for i in images]
    assert torch.isfinite(mllm(**batch).loss)


def numbers(split: str, count: int = 5) -> Dataset:
    """A ``"module:function"`` source: ``count`` samples naming their split."""
    return Dataset.from_dict({"prompt": [f"{split} {i}" for i in range(count)], "answer": ["seven"] * count})


def test_module_function_gets_the_split_and_kwargs_and_is_limited():
    spec = DatasetSpec("tests.data.test_sources:numbers", split="val", limit=2, kwargs={"count": 4})
    assert load_split(spec)["prompt"] == ["val 0", "val 1"]


def test_in_memory_split_is_taken_as_it_is_and_media_paths_follow_the_first_data_file(tmp_path):
    data = Dataset.from_dict({"prompt": ["which digit ?"], "answer": ["seven"]})
    assert load_split(data) is data and media_dir(data) is None and media_dir(None) is None
    first = os.path.join(tmp_path, "a", "train.jsonl")
    assert media_dir(DatasetSpec("json", data_files={"train": [first, "b.jsonl"]})) == os.path.join(tmp_path, "a")
    assert media_dir(DatasetSpec("imagefolder", data_dir="pics")) == "pics"
