"""Llava-Next's "anyres" for any vision tower and any LM: tiles, spatial unpadding and a learned image newline.

The image processor (``LlavaNextImageProcessor``) cuts each image into a base tile (the whole image, resized) and
the tiles of the grid resolution that fits it best (``image_grid_pinpoints``), and returns ``pixel_values``
``[images, max_tiles, 3, tile, tile]`` with each image's ``image_sizes`` ``(height, width)``. The vision encoder
then:

1. :class:`AnyresTiles` (``preprocess_callback``): keeps each image's real tiles, ``[all tiles, 3, tile, tile]``;
2. the tower and a feature selection (:class:`~cornstarch.models.feature_selection.SelectFeatures`), the projector;
3. :class:`PackImageFeatures` (``postprocess_projector_callback``): per image, the base tile's features, then the
   grid's features laid out as rows of the image with the padding rows or columns removed (transformers'
   ``pack_image_features``, "spatial unpad"), each row ended by the learned ``image_newline``.

The image's feature count follows from its size alone (:func:`anyres_feature_count`), so the processor expands
each placeholder exactly. :func:`anyres_encoder` wires the three for any tower:

>>> import transformers as tf
>>> clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=2,
...                                               num_attention_heads=2, image_size=8, patch_size=4))
>>> vision = anyres_encoder(clip, hidden_size=16, image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]])
>>> tiles = torch.randn(1, 3, 3, 8, 8)  # one image: its base tile and a 1x2 grid
>>> from cornstarch.models import MultimodalProjector, MultimodalProjectorConfig
>>> vision.projector = MultimodalProjector(MultimodalProjectorConfig(8, 16, "mlp"))  # (MultimodalModel adds one)
>>> vision(pixel_values=tiles, image_sizes=torch.tensor([[6, 13]])).shape
torch.Size([14, 16])
>>> anyres_feature_count(6, 13, per_tile=4, image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]], tile_size=8,
...                      patch_size=4)
14
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

from .callbacks import ConfiguredCallback
from .feature_selection import SelectFeatures
from .multimodal_language_model import ModalEncoderModule

IMAGE_SIZES = "image_sizes"

__all__ = ["AnyresTiles", "PackImageFeatures", "anyres_encoder", "anyres_feature_count", "tiles_per_image"]


def _pinpoints(image_grid_pinpoints: Any) -> tuple[tuple[int, int], ...]:
    return tuple((int(h), int(w)) for h, w in image_grid_pinpoints)


def _sizes(image_sizes: Any) -> list[tuple[int, int]]:
    """``(height, width)`` per image, read on the host (a CPU tensor costs no device synchronisation)."""
    rows = image_sizes.tolist() if isinstance(image_sizes, (torch.Tensor, np.ndarray)) else image_sizes
    return [(int(h), int(w)) for h, w in rows]


@functools.lru_cache(maxsize=65536)
def _tiles(height: int, width: int, pinpoints: tuple, tile_size: int) -> int:
    return image_size_to_num_patches((height, width), [list(p) for p in pinpoints], tile_size)


def tiles_per_image(image_sizes: Any, image_grid_pinpoints: Any, tile_size: int) -> list[int]:
    """Tiles each image is cut into (its base tile plus its grid's), from its ``(height, width)``.

    >>> tiles_per_image([[6, 13], [8, 8]], [[8, 16], [16, 8], [16, 16]], tile_size=8)
    [3, 3]
    """
    pinpoints = _pinpoints(image_grid_pinpoints)
    return [_tiles(h, w, pinpoints, tile_size) for h, w in _sizes(image_sizes)]


def anyres_feature_count(height: int, width: int, per_tile: int, image_grid_pinpoints: Any, tile_size: int,
                         patch_size: int) -> int:
    """Features an image of ``height`` × ``width`` pixels yields: its base tile's ``per_tile``, then its grid's
    patches with the padding rows (or columns) removed, plus one newline per row.

    Args:
        height, width: the image's original size.
        per_tile: features per tile after selection (patches, without CLS).
        image_grid_pinpoints: the grid resolutions ``[[height, width], ...]``.
        tile_size: the tower's input resolution (pixels per tile side).
        patch_size: the tower's patch size.

    Returns:
        The image's feature count (as :class:`PackImageFeatures` produces them).
    """
    side = tile_size // patch_size
    best_height, best_width = select_best_resolution((height, width), [list(p) for p in image_grid_pinpoints])
    rows, columns = side * (best_height // tile_size), side * (best_width // tile_size)
    if width / height > columns / rows:  # wider than the grid: padding rows above and below
        rows -= 2 * ((rows - int(round(height * (columns / width), 7))) // 2)
    else:
        columns -= 2 * ((columns - int(round(width * (rows / height), 7))) // 2)
    return per_tile + rows * columns + rows


@functools.lru_cache(maxsize=65536)
def _layout(height: int, width: int, tiles: int, per_tile: int, pinpoints: tuple, tile_size: int,
            patch_size: int) -> np.ndarray:
    """Where each packed feature of one image comes from: its row among the image's ``tiles * per_tile``
    features, -1 for the newline. transformers' own ``pack_image_features`` is applied to the positions."""
    positions = torch.arange(tiles * per_tile).view(tiles, per_tile, 1)
    owner = SimpleNamespace(config=SimpleNamespace(
        image_grid_pinpoints=[list(p) for p in pinpoints],
        vision_config=SimpleNamespace(image_size=tile_size, patch_size=patch_size)))
    packed, _ = LlavaNextModel.pack_image_features(owner, [positions], [[height, width]], "default",
                                                   image_newline=torch.tensor([-1]))
    return packed[0].flatten().numpy()


class AnyresTiles(ConfiguredCallback):
    """``preprocess_callback``: ``pixel_values`` ``[images, max_tiles, 3, tile, tile]`` (tiles padded to the
    batch's most) → each image's real tiles, ``[all tiles, 3, tile, tile]``; 4-D ``pixel_values`` pass as they are.

    Args:
        image_grid_pinpoints: the grid resolutions ``[[height, width], ...]`` (the image processor's).
        tile_size: the tower's input resolution.

    Raises:
        ValueError (when called): for 5-D ``pixel_values`` without ``image_sizes``.
    """

    input_names = frozenset({IMAGE_SIZES})

    def __init__(self, image_grid_pinpoints: list[list[int]], tile_size: int):
        self.image_grid_pinpoints = [list(p) for p in _pinpoints(image_grid_pinpoints)]
        self.tile_size = int(tile_size)

    def get_config(self) -> dict[str, Any]:
        return {"image_grid_pinpoints": self.image_grid_pinpoints, "tile_size": self.tile_size}

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
        pixel_values = inputs["pixel_values"]
        if pixel_values.dim() != 5:
            return inputs
        if inputs.get(IMAGE_SIZES) is None:
            raise ValueError("pixel_values of anyres tiles [images, tiles, 3, H, W] need image_sizes.")
        tiles = tiles_per_image(inputs[IMAGE_SIZES], self.image_grid_pinpoints, self.tile_size)
        most = pixel_values.shape[1]
        index = np.concatenate([np.arange(i * most, i * most + n) for i, n in enumerate(tiles)])
        index = torch.from_numpy(index).to(pixel_values.device, non_blocking=True)
        return {**inputs, "pixel_values": pixel_values.flatten(0, 1).index_select(0, index)}


class PackImageFeatures(ConfiguredCallback, nn.Module):
    """``postprocess_projector_callback`` with the learned ``image_newline``: Llava-Next's feature packing.

    Features ``[all tiles, per_tile, hidden]`` → ``[image features, hidden]``, image after image, each laid out
    by transformers' ``LlavaNextModel.pack_image_features`` (spatial unpad, a newline after each row). The layout
    of each image size is worked out once on the host (from ``image_sizes``) as an index; the forward is one
    gather, with gradients reaching the features and the newline. Without ``image_sizes`` each item is a single
    tile: its features and one newline.

    Args:
        hidden_size: the LM's embedding width (the newline's size).
        image_grid_pinpoints: the grid resolutions.
        tile_size: the tower's input resolution.
        patch_size: the tower's patch size.

    Raises:
        ValueError (when called): when the tiles' feature count is not the tile's patch grid (a CLS token kept:
            use the ``"default"`` strategy for towers with one), or the tiles do not match ``image_sizes``.
    """

    input_names = frozenset({IMAGE_SIZES})

    def __init__(self, hidden_size: int, image_grid_pinpoints: list[list[int]], tile_size: int, patch_size: int):
        nn.Module.__init__(self)
        self.hidden_size = int(hidden_size)
        self.image_grid_pinpoints = [list(p) for p in _pinpoints(image_grid_pinpoints)]
        self.tile_size, self.patch_size = int(tile_size), int(patch_size)
        self.image_newline = nn.Parameter(torch.randn(self.hidden_size) / math.sqrt(self.hidden_size))

    def get_config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "image_grid_pinpoints": self.image_grid_pinpoints,
                "tile_size": self.tile_size, "patch_size": self.patch_size}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())

    __repr__ = nn.Module.__repr__

    def recount_features(self, counts: list[int], outputs: dict[str, Any]) -> list[int]:
        """Each image's features from its size (``image_sizes`` of the processor outputs); ``counts`` hold the
        features per tile."""
        sizes = outputs.get(IMAGE_SIZES)
        if sizes is None:
            return [c + 1 for c in counts]
        return [anyres_feature_count(h, w, c, self.image_grid_pinpoints, self.tile_size, self.patch_size)
                for c, (h, w) in zip(counts, _sizes(sizes))]

    def pack_index(self, image_sizes: Any, tiles: int, per_tile: int) -> torch.Tensor:
        """``[image features]`` rows into ``[tiles * per_tile + 1]`` (the last row: the newline), on the CPU."""
        newline = tiles * per_tile
        if image_sizes is None:
            rows = np.arange(newline).reshape(tiles, per_tile)
            return torch.from_numpy(np.concatenate([rows, np.full((tiles, 1), newline)], axis=1).reshape(-1))
        side = self.tile_size // self.patch_size
        if per_tile != side * side:
            raise ValueError(f"Anyres tiles have {per_tile} features each, but a {self.tile_size}-pixel tile of "
                             f"{self.patch_size}-pixel patches is a {side}x{side} grid; drop the CLS token "
                             "(strategy 'default') for towers that have one.")
        sizes = _sizes(image_sizes)
        counts = tiles_per_image(sizes, self.image_grid_pinpoints, self.tile_size)
        if sum(counts) != tiles:
            raise ValueError(f"image_sizes {sizes} make {sum(counts)} tiles but the encoder got {tiles}.")
        pinpoints = _pinpoints(self.image_grid_pinpoints)
        parts, start = [], 0
        for (height, width), n in zip(sizes, counts):
            layout = _layout(height, width, n, per_tile, pinpoints, self.tile_size, self.patch_size)
            parts.append(np.where(layout < 0, newline, layout + start))
            start += n * per_tile
        return torch.from_numpy(np.concatenate(parts))

    def forward(self, inputs: dict[str, Any], output: Any) -> tuple[torch.Tensor]:
        features = output if isinstance(output, torch.Tensor) else output[0]  # [tiles, per_tile, hidden]
        tiles, per_tile, hidden = features.shape
        index = self.pack_index(inputs.get(IMAGE_SIZES), tiles, per_tile).to(features.device, non_blocking=True)
        rows = torch.cat([features.reshape(-1, hidden), self.image_newline[None].to(features.dtype)])
        return (rows.index_select(0, index),)  # [image features, hidden]


def anyres_encoder(tower: nn.Module, hidden_size: int, image_grid_pinpoints: list[list[int]],
                   vision_feature_layer: int | list[int] = -2, vision_feature_select_strategy: str = "default",
                   projector: nn.Module | None = None) -> ModalEncoderModule:
    """A Llava-Next vision encoder around any tower (CLIP, SigLIP, …) with an input resolution and patches.

    Args:
        tower: the vision tower (its config gives ``image_size`` and ``patch_size``).
        hidden_size: the LM's embedding width.
        image_grid_pinpoints: the grid resolutions (those of the image processor).
        vision_feature_layer, vision_feature_select_strategy: the feature selection (``"default"`` drops CLS:
            use ``"full"`` for towers without one, such as SigLIP).
        projector: the projector, or None for the one :class:`MultimodalModel` creates.

    Returns:
        A :class:`ModalEncoderModule` taking ``pixel_values`` and ``image_sizes``.
    """
    tile, patch = tower.config.image_size, tower.config.patch_size
    return ModalEncoderModule(
        tower, projector=projector, preprocess_callback=AnyresTiles(image_grid_pinpoints, tile),
        postprocess_module_callback=SelectFeatures(vision_feature_layer, vision_feature_select_strategy),
        postprocess_projector_callback=PackImageFeatures(hidden_size, image_grid_pinpoints, tile, patch))
