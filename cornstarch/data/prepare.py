"""Convert a LLaVA / ShareGPT / messages-format JSON file and its image folder into tar shards for streaming.

Run ``python -m cornstarch.data.prepare DATA.json --image-root IMAGES --out SHARDS`` (or call :func:`prepare`).
Each sample becomes a ``KEY.json`` member (its messages, ``<image>`` where each image goes, and the names of its
image members) followed by ``KEY.N.EXT`` members holding the image files' bytes: the WebDataset layout. ``index.json``
records each sample's byte range (for :class:`~cornstarch.data.streaming.ShardStream`), and ``report.json`` the rows
skipped, with their reasons, and the paths of corrupt images. Train on the shards with ``path: shards`` and
``data_dir: SHARDS`` in a :class:`~cornstarch.data.DatasetSpec`.
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

from .formats import FORMATS, SOURCE_PLACEHOLDER, RowReader
from .media import SampleError
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
            samples_per_shard: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Write the rows of ``data_file`` as tar shards in ``out_dir``, skipping and counting bad rows.

    A row is skipped (and listed in ``report.json`` with its reason) when the reader rejects it (see
    :class:`~cornstarch.data.formats.RowReader`: unknown speaker, placeholder/image mismatch, missing image, image
    outside ``image_root``, …) or when one of its images does not decode (its path is also listed under
    ``corrupt_images``).

    Args:
        data_file: the rows (``.json`` list or ``.jsonl``).
        out_dir: where the shards, ``index.json`` and ``report.json`` go (created).
        image_root: the directory image paths are relative to (default: ``data_file``'s directory).
        format: ``"llava"``, ``"sharegpt"`` or ``"messages"``.
        samples_per_shard: samples per tar shard.
        progress: show a progress bar.

    Returns:
        The report: ``rows``, ``samples`` written, ``shards``, ``skipped`` (``[{"row", "reason"}]``),
        ``corrupt_images`` (paths).

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
    reader = RowReader(format, SOURCE_PLACEHOLDER, image_root, on_bad_row="skip")
    os.makedirs(out_dir, exist_ok=True)
    writer = _ShardWriter(out_dir, samples_per_shard)
    corrupt: list[str] = []
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
            writer.add(index, sample["messages"], images, [os.path.splitext(p)[1].lower() for p in sample["images"]])
    shards = writer.close()
    report = {"rows": rows, "samples": writer.samples, "shards": len(shards),
              "skipped": [{"row": row, "reason": reason} for row, reason in reader.skipped],
              "corrupt_images": corrupt}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"format": INDEX_FORMAT, "source": os.path.abspath(data_file), "samples": writer.samples,
                   "shards": shards}, f)
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=1)
    return report


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
    """Tar shards of ``samples_per_shard`` samples, with each sample's byte range."""

    def __init__(self, out_dir: str, samples_per_shard: int):
        self.out_dir, self.samples_per_shard = out_dir, samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self.tar: tarfile.TarFile | None = None
        self.samples = 0

    def add(self, row: int, messages: list[dict[str, str]], images: list[bytes], extensions: list[str]) -> None:
        if self.tar is None or len(self.shards[-1]["offsets"]) >= self.samples_per_shard:
            self._close_shard()
            name = f"shard-{len(self.shards):06d}.tar"
            self.tar = tarfile.open(os.path.join(self.out_dir, name), "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"file": name, "offsets": []})
        key = f"{row:09d}"
        names = [f"{key}.{i}{ext or '.png'}" for i, ext in enumerate(extensions)]
        self.shards[-1]["offsets"].append(self.tar.offset)  # the sample's first byte
        self._member(f"{key}.json", json.dumps({"key": row, "messages": messages, "images": names}).encode())
        for name, data in zip(names, images):
            self._member(name, data)
        self.samples += 1

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m cornstarch.data.prepare``: see :func:`prepare`."""
    parser = argparse.ArgumentParser(prog="python -m cornstarch.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("data_file", help="the rows: a .json list or .jsonl")
    parser.add_argument("--out", required=True, help="folder for the shards, index.json and report.json")
    parser.add_argument("--image-root", help="folder image paths are relative to (default: the data file's)")
    parser.add_argument("--format", default="llava", choices=FORMATS)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    report = prepare(args.data_file, args.out, args.image_root, args.format, args.samples_per_shard)
    print(f"{report['samples']} of {report['rows']} rows written to {report['shards']} shards in {args.out}; "
          f"{len(report['skipped'])} skipped ({len(report['corrupt_images'])} with corrupt images): see "
          f"{os.path.join(args.out, REPORT_FILE)}")
    return report


if __name__ == "__main__":
    main()
