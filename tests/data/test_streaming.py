"""Streaming: prepare writes tar shards (corrupt images skipped and reported); the stream reshuffles per epoch, deals
samples to ranks and workers without overlap, and a resumed loader gives the uninterrupted run's batches bit for bit
(raw and encoded shards and ``datasets`` streams, workers, ranks, mid-epoch), and the same losses."""

from __future__ import annotations

import json
import os
import tarfile
from itertools import islice

import numpy as np
import pytest
import torch
import webdataset

from cornstarch.data import DatasetSpec, MultimodalCollator, MultimodalDataModule
from cornstarch.data.prepare import main as prepare_main
from cornstarch.data.prepare import prepare
from cornstarch.data.streaming import ShardStream, StreamingBatches, StreamingLoader
from tests.data.llava_data import write_llava
from tests.data.test_collator import make

ROWS = 60


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """60 LLaVA rows (0–2 images each); row 2's second image is corrupt, row 4's image is missing."""
    root = tmp_path_factory.mktemp("llava")
    path = write_llava(str(root), ROWS)
    rows = json.load(open(path))
    with open(root / rows[2]["images"][1], "wb") as f:
        f.write(b"\x89PNG not really")
    os.remove(root / rows[4]["image"])
    report = prepare(path, str(root / "shards"), samples_per_shard=7, progress=False)
    encoded = prepare(path, str(root / "encoded"), samples_per_shard=7, progress=False,
                      collator=MultimodalCollator(make()[1]))
    assert encoded["samples"] == report["samples"] and encoded["corrupt_images"] == report["corrupt_images"]
    return root, path, report


def test_prepare_writes_webdataset_shards_and_reports_skipped_rows(data, tmp_path, capsys):
    root, path, report = data
    assert report["rows"] == ROWS and report["samples"] == ROWS - 2 and report["shards"] == 9
    assert [s["row"] for s in report["skipped"]] == [2, 4]
    assert "corrupt image" in report["skipped"][0]["reason"] and "not found" in report["skipped"][1]["reason"]
    assert report["corrupt_images"] == [os.path.realpath(root / json.load(open(path))[2]["images"][1])]
    assert json.load(open(root / "shards" / "report.json")) == report
    with tarfile.open(root / "shards" / "shard-000000.tar") as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile("000000001.json"))
    assert names[:7] == ["000000000.json", "000000001.json", "000000001.0.png", "000000003.json", "000000005.json",
                         "000000005.0.png", "000000005.1.png"], "each sample: KEY.json then its KEY.N.png images"
    assert meta["images"] == ["000000001.0.png"] and meta["messages"][0]["content"].count("<image>") == 1
    assert prepare_main([path, "--out", str(tmp_path / "cli"), "--samples-per-shard", "100"])["samples"] == ROWS - 2
    assert "58 of 60 rows written (raw) to 1 shards" in capsys.readouterr().out
    make()[1].save_pretrained(tmp_path / "processor")  # encoded with a saved processor
    encoded = prepare_main([path, "--out", str(tmp_path / "encoded"), "--processor", str(tmp_path / "processor")])
    assert encoded["encoded"] and encoded["samples"] == ROWS - 2
    assert "58 of 60 rows written (encoded) to 1 shards" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["shards", "encoded"])
def test_the_webdataset_library_reads_every_sample_the_stream_reads(data, kind):
    """An independent reader of the layout: ``webdataset.WebDataset`` over the shards yields, sample by sample, the
    keys and member bytes the stream reads through ``index.json``'s byte ranges, and the encoded columns as arrays."""
    stream = ShardStream(str(data[0] / kind), shuffle_buffer=0)
    ours = []
    for ref in stream.refs(0):
        members = stream.members(ref)
        key = next(name for name in members if name.endswith(".json"))[:-len(".json")]
        ours.append({"__key__": key, **{name[len(key) + 1:]: value for name, value in members.items()}})
    theirs = [{k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")}
              for sample in webdataset.WebDataset(stream.files, shardshuffle=False, empty_check=False)]
    assert len(theirs) == len(ours) == ROWS - 2 and theirs == ours
    if kind == "encoded":  # the columns decode with webdataset's own .npy decoder
        decoded = next(iter(webdataset.WebDataset(stream.files[:1], shardshuffle=False).decode()))
        sample = stream.load(0)
        assert all(np.array_equal(decoded[f"{name}.npy"], sample[name]) for name in ("input_ids", "labels"))


def test_each_epoch_is_a_new_shuffle_of_every_sample(data):
    stream = ShardStream(str(data[0] / "shards"), shuffle_buffer=10, seed=3)
    epochs = [list(stream.refs(e)) for e in range(3)]
    assert all(sorted(e) == list(range(ROWS - 2)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] == list(ShardStream(str(data[0] / "shards"), 10, 3).refs(0))
    assert list(ShardStream(str(data[0] / "shards"), shuffle_buffer=0).refs(5)) == list(range(ROWS - 2))
    sample = stream.load(1)
    assert sample["__index__"] == 1 and len(sample["images"]) == 1 and sample["images"][0][:4] == b"\x89PNG"


def keys(samples: list[dict]) -> list[int]:
    return [s["__index__"] for s in samples]


def loader(shards: str, rank: int = 0, ranks: int = 1, workers: int = 0, batch: int = 3) -> StreamingLoader:
    return StreamingLoader(StreamingBatches(ShardStream(shards, shuffle_buffer=8, seed=1), batch, keys, ranks, rank),
                           num_workers=workers)


@pytest.mark.parametrize("kind", ["shards", "encoded"])
@pytest.mark.parametrize("ranks, workers", [(1, 0), (1, 2), (2, 2)])
def test_ranks_and_workers_share_an_epoch_without_overlap_and_resume_at_every_batch(data, ranks, workers, kind):
    shards = str(data[0] / kind)
    whole = {r: [b for loader_ in [loader(shards, r, ranks)] for _ in range(2) for b in loader_] for r in range(ranks)}
    length = (ROWS - 2) // (ranks * 3)
    epoch0 = [k for r in range(ranks) for b in whole[r][:length] for k in b]
    assert len(epoch0) == len(set(epoch0)) == length * ranks * 3, "every sample of the epoch once, on one rank"
    assert whole[0][:length] != whole[0][length:], "the next epoch is reshuffled"
    for r in range(ranks):
        assert [b for b in loader(shards, r, ranks, workers)] == whole[r][:length], "workers keep the order"
        for stop in range(0, 2 * length, 3 if workers else 1):
            first = loader(shards, r, ranks, workers)
            seen = list(islice((b for _ in range(2) for b in first), stop))
            again = loader(shards, r, ranks, workers)
            again.load_state_dict(first.state_dict())
            rest = [b for _ in range(2 - stop // length) for b in again]
            assert seen + rest == whole[r], (r, stop)


def module(spec: DatasetSpec, proc, rank: int = 0, ranks: int = 1, workers: int = 2) -> MultimodalDataModule:
    dm = MultimodalDataModule(train=spec, processor=proc, batch_size=4, num_workers=workers, shuffle_buffer=16,
                              seed=5)
    if ranks > 1:  # as under a 2-process strategy
        dm._ranks = lambda: {"num_replicas": ranks, "rank": rank}
    dm.setup("fit")
    return dm


def losses(mllm, batches) -> list[float]:
    with torch.no_grad():
        return [float(mllm(**{k: v for k, v in b.items() if k != "supervised_positions"}).loss) for b in batches]


@pytest.mark.parametrize("source", ["shards", "encoded", "datasets_stream"])
def test_data_module_streams_and_resumes_mid_epoch_bit_for_bit(data, source):
    root, path, _ = data
    mllm, proc = make()
    if source in ("shards", "encoded"):
        spec = DatasetSpec("shards", data_dir=str(root / source))
    else:  # the rows prepare skipped left out (the stream would raise at row 2's corrupt image)
        clean = root / "clean.jsonl"
        clean.write_text("".join(json.dumps(row) + "\n" for i, row in enumerate(json.load(open(path))) if i not in (2, 4)))
        spec = DatasetSpec("json", data_files=str(clean), format="llava", streaming=True, limit=ROWS - 2)
    for rank in range(2):
        whole = [b for dm in [module(spec, proc, rank, 2)] for _ in range(2) for b in dm.train_dataloader()]
        assert len(whole) == 2 * ((ROWS - 2) // 8)
        first = module(spec, proc, rank, 2)
        seen = list(islice(iter(first.train_dataloader()), 4))  # mid-epoch 0
        state = first.state_dict()
        assert state == {"train_position": {"epoch": 0, "batch": 4, "epoch_length": len(whole) // 2}}
        resumed = module(spec, proc, rank, 2)
        resumed.load_state_dict(state)
        rest = [b for _ in range(2) for b in resumed.train_dataloader()]
        assert len(seen + rest) == len(whole)
        for got, want in zip(seen + rest, whole):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert losses(mllm, rest) == losses(mllm, whole[4:]), "bit-identical losses"


def test_a_stream_needs_its_epoch_size_and_only_the_train_split_streams(data):
    root, path, _ = data
    _, proc = make()
    stream = DatasetSpec("json", data_files=path, format="llava", streaming=True)
    with pytest.raises(ValueError, match="does not say how many samples it has .* set the spec's limit"):
        MultimodalDataModule(train=stream, processor=proc).setup("fit")
    shards = DatasetSpec("shards", data_dir=str(root / "encoded"))
    with pytest.raises(ValueError, match="The val split is streamed .* only the train split streams"):
        MultimodalDataModule(val=shards, processor=proc).setup("validate")
    with pytest.raises(ValueError, match="cannot be packed or grouped by length"):
        MultimodalDataModule(train=shards, processor=proc, group_by_length=True).setup("fit")
