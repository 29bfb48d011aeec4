"""Convert a LLaVA / ShareGPT / messages-format JSON file and its image folder into tar shards for streaming.

Run ``cornstarch prepare --config CONFIG --output_dir SHARDS`` (the config's ``data.train``, encoded with its
model's processor: :func:`prepare_split`), ``python -m cornstarch.data.prepare DATA.json --image-root IMAGES --out
SHARDS [--processor SAVED_PROCESSOR]``, or call :func:`prepare`. Shards use the WebDataset layout: each sample is a
``KEY.json`` member followed by its ``KEY.NAME.npy`` columns when encoded for a processor
(:mod:`~cornstarch.data.encoded_shards`), or by its ``KEY.N.EXT`` image files' bytes when raw (its messages, with
``<image>`` where each image goes, in ``KEY.json``). ``index.json`` records each sample's byte range, source row and
(encoded) token length, and what the samples were encoded with; ``report.json`` the rows skipped, with their
reasons, and the paths of corrupt images. Train on the shards with ``path: shards`` and ``data_dir: SHARDS`` in a
:class:`~cornstarch.data.DatasetSpec`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any

from PIL import Image

from ..batch import INDEX_KEY
from .collator import MultimodalCollator
from .encoded import ENCODE_BATCH
from .encoded_shards import sample_members
from .fingerprint import encoding_fingerprint
from .formats import FORMATS, SOURCE_PLACEHOLDER, RowReader
from .media import SampleError
from .sources import DatasetSpec
from .streaming import INDEX_FILE, INDEX_FORMAT

REPORT_FILE = "report.json"


def read_rows(path: str) -> Iterator[dict[str, Any]]:
    """Rows of a ``.jsonl`` file (read line by line) or a ``.json`` list (read whole).

    Raises:
        ValueError: naming the line of a ``.jsonl`` row that is not a JSON object, or for a ``.json`` that is not a
            list of objects.
    """
    if path.endswith(".jsonl"):
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}, line {number}: not a JSON object ({err}).") from err
        return
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}.")
    yield from rows


def prepare(data_file: str, out_dir: str, image_root: str | None = None, format: str = "llava",
            samples_per_shard: int = 1000, progress: bool = True,
            collator: MultimodalCollator | None = None) -> dict[str, Any]:
    """Write the rows of ``data_file`` as tar shards in ``out_dir``, skipping and counting bad rows.

    With a ``collator`` (the train split's, e.g. ``MultimodalDataModule.collator("train")``), each sample is
    written encoded (:mod:`~cornstarch.data.encoded_shards`: token ids with modality spans expanded, labels, the
    processor's outputs such as ``pixel_values``) and ``index.json`` records the processor's fingerprint
    (:func:`~cornstarch.data.fingerprint.encoding_fingerprint`): streaming then only reads and pads, and refuses a
    run whose processor differs. Without one, each sample is its messages and its image files' bytes (raw shards,
    decoded, processed and tokenized by the train loader's workers at every epoch, for any processor).

    A row is skipped (and listed in ``report.json`` with its reason) when the reader rejects it (see
    :class:`~cornstarch.data.formats.RowReader`: unknown speaker, placeholder/image mismatch, missing image, image
    outside ``image_root``, …), when one of its images does not decode (its path is also listed under
    ``corrupt_images``), or, encoding, when the collator refuses it (e.g. an image too small for the processor).

    Args:
        data_file: the rows (``.json`` list or ``.jsonl``).
        out_dir: where the shards, ``index.json`` and ``report.json`` go (created).
        image_root: the directory image paths are relative to (default: ``data_file``'s directory).
        format: ``"llava"``, ``"sharegpt"`` or ``"messages"``.
        samples_per_shard: samples per tar shard.
        progress: show a progress bar.
        collator: encode the samples with it (``None``: raw shards).

    Returns:
        The report: ``rows``, ``samples`` written, ``shards``, ``encoded`` (whether the samples are),
        ``skipped`` (``[{"row", "reason"}]``), ``corrupt_images`` (paths).

    Raises:
        ValueError: if the processor's outputs are not one row per item (they cannot be stored per sample: write
            raw shards).

    >>> import tempfile
    >>> from PIL import Image
    >>> root = tempfile.mkdtemp()
    >>> Image.new("RGB", (8, 8)).save(os.path.join(root, "a.png"))
    >>> _ = open(os.path.join(root, "bad.png"), "w").write("not a png")
    >>> rows = [{"image": name, "conversations": [{"from": "human", "value": "<image> What?"},
    ...                                           {"from": "gpt", "value": "A square."}]} for name in ["a.png", "bad.png"]]
    >>> json.dump(rows, open(os.path.join(root, "data.json"), "w"))
    >>> report = prepare(os.path.join(root, "data.json"), os.path.join(root, "shards"), progress=False)
    >>> report["samples"], report["corrupt_images"] == [os.path.join(os.path.realpath(root), "bad.png")]
    (1, True)
    """
    from tqdm.auto import tqdm

    image_root = image_root or os.path.dirname(os.path.abspath(data_file))
    reader = RowReader(format, _placeholder(collator), image_root, on_bad_row="skip")
    os.makedirs(out_dir, exist_ok=True)
    writer = _ShardWriter(out_dir, samples_per_shard)
    corrupt: list[str] = []
    pending: list[dict[str, Any]] = []  # samples waiting to be encoded together
    rows = 0
    for index, row in enumerate(tqdm(read_rows(data_file), desc=f"Writing shards to {out_dir}", unit=" rows",
                                     disable=not progress)):
        rows += 1
        sample = reader.try_read(row, index)
        if sample is None:
            continue
        images = []
        for i, path in enumerate(sample["images"]):
            try:
                images.append(_image_bytes(path, index, i))
            except SampleError as err:
                reader.skipped.append((index, str(err)))
                corrupt.append(path)
                break
        else:
            if collator is None:
                writer.add(index, _raw_members(index, sample["messages"], images, sample["images"]))
                continue
            pending.append({"messages": sample["messages"], "images": images, INDEX_KEY: index})
            if len(pending) == ENCODE_BATCH:
                _write_encoded(writer, collator, pending, reader.skipped)
                pending = []
    if pending:
        _write_encoded(writer, collator, pending, reader.skipped)
    shards = writer.close()
    report = {"rows": rows, "samples": writer.samples, "shards": len(shards), "encoded": collator is not None,
              "skipped": [{"row": row, "reason": reason} for row, reason in sorted(reader.skipped)],
              "corrupt_images": corrupt}
    encoding = None if collator is None else {"fingerprint": encoding_fingerprint(collator),
                                              "placeholder": _placeholder(collator)}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"format": INDEX_FORMAT, "source": os.path.abspath(data_file), "samples": writer.samples,
                   "encoding": encoding, "shards": shards}, f)
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _placeholder(collator: MultimodalCollator | None) -> str:
    """The image placeholder the shards' text holds: the model's image token when encoding, else ``<image>``."""
    if collator is None:
        return SOURCE_PLACEHOLDER
    tokens = collator.processor.tokens
    return next((tokens[key] for key, name in collator.fields.items() if name == "images"), SOURCE_PLACEHOLDER)


def _raw_members(row: int, messages: list[dict[str, str]], images: list[bytes],
                 paths: list[str]) -> list[tuple[str, bytes]]:
    """A raw sample's members: ``KEY.json`` (its messages and image member names), then ``KEY.N.EXT`` images."""
    key = f"{row:09d}"
    names = [f"{key}.{i}{os.path.splitext(p)[1].lower() or '.png'}" for i, p in enumerate(paths)]
    meta = {"key": row, "messages": messages, "images": names}
    return [(f"{key}.json", json.dumps(meta).encode()), *zip(names, images)]


def _write_encoded(writer: "_ShardWriter", collator: MultimodalCollator, samples: list[dict[str, Any]],
                   skipped: list[tuple[int, str]]) -> None:
    """Encode ``samples`` in one collator call and write them; if the collator refuses one, each is encoded alone
    and those it refuses are skipped (with their reasons)."""
    try:
        encoded = [(samples, collator.encode(samples))]
    except SampleError:
        encoded = []
        for sample in samples:
            try:
                encoded.append(([sample], collator.encode([sample])))
            except SampleError as err:
                skipped.append((sample[INDEX_KEY], str(err)))
    for group, columns in encoded:
        for i, sample in enumerate(group):
            row = sample[INDEX_KEY]
            writer.add(row, sample_members(f"{row:09d}", row, columns, i), len(columns["input_ids"][i]))


def _image_bytes(path: str, index: int, item: int) -> bytes:
    """The file's bytes, after checking that they decode as an image."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 (PIL raises many kinds for a corrupt file)
        raise SampleError(index, f"images[{item}]", f"corrupt image {path!r} ({type(err).__name__}: {err}).") from err
    return data


class _ShardWriter:
    """Tar shards of ``samples_per_shard`` samples, with each sample's byte range, source row and token length."""

    def __init__(self, out_dir: str, samples_per_shard: int):
        self.out_dir, self.samples_per_shard = out_dir, samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self.tar: tarfile.TarFile | None = None
        self.samples = 0

    def add(self, row: int, members: list[tuple[str, bytes]], length: int | None = None) -> None:
        if self.tar is None or len(self.shards[-1]["offsets"]) >= self.samples_per_shard:
            self._close_shard()
            name = f"shard-{len(self.shards):06d}.tar"
            self.tar = tarfile.open(os.path.join(self.out_dir, name), "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"file": name, "offsets": [], "rows": [], "lengths": []})
        shard = self.shards[-1]
        shard["offsets"].append(self.tar.offset)  # the sample's first byte
        shard["rows"].append(row)
        shard["lengths"].append(length)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def _close_shard(self) -> None:
        """Close the open shard; its ``offsets`` end with the byte after its last sample."""
        if self.tar is not None:
            self.shards[-1]["samples"] = len(self.shards[-1]["offsets"])
            self.shards[-1]["offsets"].append(self.tar.offset)
            self.tar.close()
            self.tar = None

    def close(self) -> list[dict[str, Any]]:
        self._close_shard()
        return self.shards


def prepare_split(datamodule: Any, out_dir: str, split: str = "train", encode: bool = True,
                  samples_per_shard: int = 1000, progress: bool = True) -> dict[str, Any]:
    """:func:`prepare` for a split of a :class:`~cornstarch.data.MultimodalDataModule` (what ``cornstarch prepare
    --config ...`` runs): its data file, ``format`` and ``image_root``, encoded (``encode``) with the train collator
    (streamed shards are train data).

    Raises:
        ValueError: if the split is not one JSON file read through a ``format`` (``path: json``, ``data_files``,
            ``format: llava|sharegpt|messages``).
    """
    spec = datamodule.specs.get(split)
    files = spec._json_files() if isinstance(spec, DatasetSpec) and spec.path == "json" else []
    if len(files) != 1 or not spec.format:
        raise ValueError(f"prepare converts a split read from one JSON file through a format (data.{split}: path: "
                         f"json, data_files: one .json or .jsonl file, format: llava | sharegpt | messages); "
                         f"data.{split} is {spec!r}.")
    collator = datamodule.collator("train", max_length=None) if encode else None  # shards are read for training
    return prepare(files[0], out_dir, spec.image_root or spec.base_dir, spec.format, samples_per_shard, progress,
                   collator)


def summary(report: dict[str, Any], out_dir: str) -> str:
    """One line saying what :func:`prepare` wrote and skipped, and where its report is."""
    kind = "encoded" if report.get("encoded") else "raw"
    return (f"{report['samples']} of {report['rows']} rows written ({kind}) to {report['shards']} shards in "
            f"{out_dir}; {len(report['skipped'])} skipped ({len(report['corrupt_images'])} with corrupt images): "
            f"see {os.path.join(out_dir, REPORT_FILE)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m cornstarch.data.prepare``: see :func:`prepare`."""
    parser = argparse.ArgumentParser(prog="python -m cornstarch.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("data_file", help="the rows: a .json list or .jsonl")
    parser.add_argument("--out", required=True, help="folder for the shards, index.json and report.json")
    parser.add_argument("--image-root", help="folder image paths are relative to (default: the data file's)")
    parser.add_argument("--format", default="llava", choices=FORMATS)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--processor", help="encode with the MultimodalProcessor saved in this folder "
                                            "(default: raw shards)")
    args = parser.parse_args(argv)
    collator = None
    if args.processor:
        from ..models.multimodal_language_model import MultimodalProcessor

        collator = MultimodalCollator(MultimodalProcessor.from_pretrained(args.processor))
    report = prepare(args.data_file, args.out, args.image_root, args.format, args.samples_per_shard,
                     collator=collator)
    print(summary(report, args.out))
    return report


if __name__ == "__main__":
    main()
