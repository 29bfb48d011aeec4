"""Encoded samples in tar shards: what :func:`~cornstarch.data.prepare.prepare` writes for a known processor, and
how a streamed batch is made of them.

An encoded sample is the output of :meth:`~cornstarch.data.collator.MultimodalCollator.encode` for one sample, as
WebDataset-style members: ``KEY.json`` (the source row and the token length) then one ``KEY.NAME.npy`` per column
(``input_ids`` and ``labels`` as ``int32``, each processor output as its ``[items, ...]`` array, e.g.
``pixel_values``). Streaming them only reads, shuffles and pads (:class:`EncodedSamples`): no image is decoded,
processed or tokenized while training, and a batch is exactly the one the collator makes of the raw samples.
"""

from __future__ import annotations

import ast
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..batch import INDEX_KEY
from .collator import MultimodalCollator
from .columns import TEXT_COLUMNS

NPY_MAGIC = b"\x93NUMPY"
_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}  # .npy header → (dtype, shape, size), per process


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file.

    >>> npy_bytes(np.arange(3, dtype=np.int32))[:6] == NPY_MAGIC
    True
    """
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    """The array of a ``.npy`` file's bytes, read in place (read-only); headers seen before are not parsed again
    (``np.load`` parses each, several times slower for small arrays).

    Raises:
        ValueError: if ``data`` is not a ``.npy`` file, or holds Python objects.

    >>> npy_array(npy_bytes(np.arange(6, dtype=np.float32).reshape(2, 3))).tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    if data[:6] != NPY_MAGIC:
        raise ValueError("not a .npy member")
    size, start = (2, 10) if data[6] == 1 else (4, 12)
    end = start + int.from_bytes(data[8:8 + size], "little")
    header = data[start:end]
    known = _HEADERS.get(header)
    if known is None:
        spec = ast.literal_eval(header.decode("latin1"))
        dtype = np.dtype(spec["descr"])
        if dtype.hasobject or spec["fortran_order"]:
            raise ValueError("a .npy member of Python objects or in Fortran order")
        shape = tuple(spec["shape"])
        known = _HEADERS[header] = (dtype, shape, int(np.prod(shape)))
    dtype, shape, size = known
    return np.frombuffer(data, dtype=dtype, offset=end, count=size).reshape(shape)


def sample_members(key: str, row: Any, columns: Mapping[str, list], i: int) -> list[tuple[str, bytes]]:
    """The members of sample ``i`` of encoded ``columns`` (from :meth:`MultimodalCollator.encode`), ``row`` its
    source row: ``KEY.json``, then ``KEY.NAME.npy`` for its tokens and each processor output it has items of.

    >>> names = [name for name, _ in sample_members("000000007", 7, {"input_ids": [[1, 5, 6]],
    ...     "labels": [[-100, 5, 6]], "pixel_values": [np.zeros((0, 3, 2, 2), np.float32)]}, 0)]
    >>> names
    ['000000007.json', '000000007.input_ids.npy', '000000007.labels.npy']
    """
    meta = {"key": row, "length": len(columns["input_ids"][i])}
    members = [(f"{key}.json", json.dumps(meta).encode())]
    for name, values in columns.items():
        if name in TEXT_COLUMNS:
            members.append((f"{key}.{name}.npy", npy_bytes(np.asarray(values[i], dtype=np.int32))))
        elif len(values[i]):
            members.append((f"{key}.{name}.npy", npy_bytes(values[i])))
    return members


def read_sample(members: Mapping[str, bytes]) -> dict[str, Any]:
    """An encoded sample from its members (name → bytes, see :func:`sample_members`): its columns, and its source
    row (the ``KEY`` of its names) as ``INDEX_KEY``, so errors name it."""
    sample: dict[str, Any] = {}
    for name, data in members.items():
        key, rest = name.split(".", 1)
        if rest.endswith(".npy"):
            sample[rest[:-4]] = npy_array(data)
        else:  # KEY.json: the key is the source row
            sample[INDEX_KEY] = int(key)
    return sample


class EncodedSamples:
    """The collate function of streamed encoded samples (:func:`read_sample`): padded and stacked by
    :meth:`MultimodalCollator.pad`, the batch the collator makes of the same raw samples.

    Args:
        collator: the train split's collator.

    >>> from transformers import CLIPImageProcessor
    >>> from cornstarch.demo import demo_tokenizer
    >>> from cornstarch.models.multimodal_language_model import MultimodalProcessor
    >>> processor = MultimodalProcessor({"vision": CLIPImageProcessor()}, demo_tokenizer(),
    ...     num_feature_calculation_funcs={"vision": lambda inputs, outputs: [1] * len(outputs["pixel_values"])})
    >>> collate = EncodedSamples(MultimodalCollator(processor))
    >>> batch = collate([{"input_ids": np.array([5, 6], np.int32), "labels": np.array([-100, 6], np.int32)},
    ...                  {"input_ids": np.array([7], np.int32), "labels": np.array([7], np.int32)}])
    >>> batch["input_ids"].tolist(), batch["labels"].tolist()
    ([[5, 6], [7, 0]], [[-100, 6], [7, -100]])
    """

    def __init__(self, collator: MultimodalCollator):
        self.collator = collator

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        names = dict.fromkeys(name for sample in samples for name in sample if name != INDEX_KEY)
        return self.collator.pad({name: [s[name] for s in samples if name in s] for name in names})
