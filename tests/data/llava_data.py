"""Synthetic LLaVA-format data written to disk: small PNGs and a JSON file of rows shaped like LLaVA-Instruct's
(single and multi-turn conversations, 0–2 images, ``<image>`` at the start or inside a turn)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from tests import tiny

ANSWER_WORDS = tiny.WORDS[4:20]


def write_images(root: str, count: int, size: int = 8, seed: int = 0, start: int = 0) -> list[str]:
    """``count`` random ``size``×``size`` PNGs under ``root/images`` (``0000000.png``, …; image ``i`` seeded by
    ``seed`` and ``i``), written from number ``start`` on (those before are taken as written); their relative paths."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names = [os.path.join("images", f"{i:07d}.png") for i in range(count)]
    for i in range(start, count):
        pixels = np.random.default_rng([seed, i]).integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, names[i]))
    return names


def llava_rows(n: int, images: list[str], seed: int = 0, images_per_row: int | None = None) -> list[dict]:
    """``n`` LLaVA-format rows using ``images`` in turn: row ``i`` has ``i % 3`` images (or ``images_per_row``), one
    turn or (every fourth row) two, and its ``<image>`` tokens at the start or inside the first human turn."""
    rng = np.random.default_rng(seed)
    rows, next_image = [], 0
    for i in range(n):
        count = i % 3 if images_per_row is None else images_per_row
        paths = [images[(next_image + k) % len(images)] for k in range(count)]
        next_image += count
        tags = " ".join(["<image>"] * count)
        question = f"{tags} what is this ?" if i % 2 else f"describe the {tags} picture".replace("  ", " ")
        turns = [{"from": "human", "value": question},
                 {"from": "gpt", "value": " ".join(rng.choice(ANSWER_WORDS, size=int(rng.integers(1, 4))))}]
        if i % 4 == 0:
            turns += [{"from": "human", "value": "and this ?"}, {"from": "gpt", "value": str(rng.choice(ANSWER_WORDS))}]
        row = {"id": f"row{i}", "conversations": turns}
        if count == 1:
            row["image"] = paths[0]
        elif count > 1:
            row["images"] = paths
        rows.append(row)
    return rows


def write_llava(root: str, n: int, image_count: int | None = None, size: int = 8, seed: int = 0,
                images_per_row: int | None = None, jsonl: bool = False) -> str:
    """A LLaVA-format data file of ``n`` rows under ``root`` with its images (``image_count`` distinct files, default
    one per image used); the file's path."""
    needed = n if images_per_row is None else n * images_per_row
    names = write_images(root, image_count or max(1, needed), size, seed)
    rows = llava_rows(n, names, seed, images_per_row)
    path = os.path.join(root, "data.jsonl" if jsonl else "data.json")
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            json.dump(rows, f)
    return path
