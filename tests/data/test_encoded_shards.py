"""Encoded tar shards: each sample written encoded for a processor streams into the very batches the collator makes
of the raw samples; the shards record the processor's fingerprint and refuse another; over-long samples raise
naming the row, or are left out of every epoch; a sample the collator refuses is skipped and reported."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from cornstarch.batch import INDEX_KEY
from cornstarch.data import DatasetSpec, MultimodalCollator, MultimodalDataModule, SampleError
from cornstarch.data.encoded_shards import EncodedSamples, npy_array, npy_bytes
from cornstarch.data.fingerprint import encoding_fingerprint
from cornstarch.data.prepare import prepare
from cornstarch.data.streaming import ShardStream
from cornstarch.models.multimodal_language_model import MultimodalProcessor
from tests.data.llava_data import write_llava
from tests.data.test_collator import make

ROWS = 30


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """30 LLaVA rows (0–2 images each, some multi-turn), as raw and as encoded shards of 7 samples."""
    root = tmp_path_factory.mktemp("llava")
    path = write_llava(str(root), ROWS)
    _, proc = make()
    prepare(path, str(root / "raw"), samples_per_shard=7, progress=False)
    report = prepare(path, str(root / "encoded"), samples_per_shard=7, progress=False, collator=MultimodalCollator(proc))
    return root, path, report


def stream_batches(shards: str, proc, **data) -> list[dict]:
    dm = MultimodalDataModule(train=DatasetSpec("shards", data_dir=shards), processor=proc, batch_size=4,
                              shuffle_buffer=8, seed=2, **data)
    dm.setup("fit")
    return [b for _ in range(2) for b in dm.train_dataloader()]


def test_encoded_shards_stream_the_raw_collators_batches_bit_for_bit(data):
    root, path, report = data
    assert report["encoded"] and report["samples"] == ROWS and report["skipped"] == []
    with tarfile.open(root / "encoded" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:7] == ["000000000.json", "000000000.input_ids.npy", "000000000.labels.npy", "000000001.json",
                         "000000001.input_ids.npy", "000000001.labels.npy", "000000001.pixel_values.npy"]
    _, proc = make()
    raw, encoded = stream_batches(str(root / "raw"), proc), stream_batches(str(root / "encoded"), proc, num_workers=2)
    assert len(raw) == len(encoded) == 2 * (ROWS // 4)
    for want, got in zip(raw, encoded):  # the raw shards' batches: decoded, processed and tokenized by the collator
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sum("pixel_values" in b for b in encoded) == len(encoded)


def test_a_stream_sample_is_read_without_decoding_and_pads_as_the_collator_does(data):
    root, path, _ = data
    _, proc = make()
    stream = ShardStream(str(root / "encoded"), shuffle_buffer=0)
    samples = [stream.load(i) for i in (1, 2, 3)]
    assert [s[INDEX_KEY] for s in samples] == [1, 2, 3]
    assert samples[0]["pixel_values"].shape == (1, 3, 32, 32) and samples[2].keys() == {"input_ids", "labels",
                                                                                        INDEX_KEY}
    rows = json.load(open(path))
    raw = [{**DatasetSpec("json", data_files=path, format="llava").reader()(rows[i], i), INDEX_KEY: i}
           for i in (1, 2, 3)]
    want, got = MultimodalCollator(proc, base_dir=str(root))(raw), EncodedSamples(MultimodalCollator(proc))(samples)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_npy_members_read_back_exactly():
    for array in [np.arange(7, dtype=np.int32) - 3, np.random.default_rng(0).random((2, 3, 4)).astype(np.float32),
                  np.zeros((0, 5), np.float64), np.ones((1 << 17,), np.uint8)]:  # the last: a version-1 header too
        back = npy_array(npy_bytes(array))
        assert back.dtype == array.dtype and back.shape == array.shape and np.array_equal(back, array)
    with pytest.raises(ValueError, match="not a .npy member"):
        npy_array(b"PK\x03\x04")


def test_the_fingerprint_survives_save_and_load_and_names_what_changed(data, tmp_path):
    root, _, _ = data
    _, proc = make()
    proc.save_pretrained(tmp_path / "proc")
    again = MultimodalProcessor.from_pretrained(tmp_path / "proc")
    assert encoding_fingerprint(MultimodalCollator(again)) == encoding_fingerprint(MultimodalCollator(proc))
    _, other = make(chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
    with pytest.raises(ValueError, match=r"another processor than this run's \(differs: tokenizer\)"):
        stream_batches(str(root / "encoded"), other)
    assert stream_batches(str(root / "raw"), other), "raw shards serve any processor"


def test_over_long_encoded_samples_raise_naming_the_row_or_are_left_out(data):
    root, _, _ = data
    _, proc = make()
    lengths = [n for shard in json.load(open(root / "encoded" / "index.json"))["shards"] for n in shard["lengths"]]
    limit = sorted(lengths)[-5]  # 4 samples longer
    first = next(i for i, n in enumerate(lengths) if n > limit)
    with pytest.raises(SampleError, match=f"Sample {first}, field 'messages': {lengths[first]} tokens"):
        stream_batches(str(root / "encoded"), proc, max_length=limit)
    kept = stream_batches(str(root / "encoded"), proc, max_length=limit, on_too_long="skip")
    assert len(kept) == 2 * ((ROWS - 4) // 4) and max(b["attention_mask"].sum(1).max() for b in kept) <= limit


def test_a_sample_the_collator_refuses_is_skipped_and_reported(data, tmp_path):
    _, path, _ = data
    _, proc = make()

    class Refusing(MultimodalCollator):
        def encode(self, samples):
            if any(s[INDEX_KEY] == 7 for s in samples):
                raise SampleError(7, "images[0]", "the vision processor refuses this item")
            return super().encode(samples)

    report = prepare(path, str(tmp_path / "shards"), progress=False, collator=Refusing(proc))
    assert report["samples"] == ROWS - 1 and report["skipped"] == [
        {"row": 7, "reason": "Sample 7, field 'images[0]': the vision processor refuses this item"}]
    assert 7 not in [s[INDEX_KEY] for s in map(ShardStream(str(tmp_path / "shards"), 0).load, range(ROWS - 1))]
