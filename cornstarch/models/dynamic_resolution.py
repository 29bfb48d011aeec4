"""Vision towers whose number of features varies per image: Qwen2-VL, Qwen2.5-VL, SigLIP2 NaFlex and Pixtral.

These towers read each image at (close to) its own resolution, so an image yields as many features as its patch
grid holds. What each family needs lives here:

- callbacks that let :class:`~cornstarch.models.multimodal_language_model.ModalEncoderModule` feed the tower what
  its image processor returns (:func:`family_callbacks`; a ``ModalEncoderModule`` given none of its own applies them
  by itself) and keep only the features the tower computes for real patches;
- count functions giving the features per image from the processor's outputs (registered in
  :mod:`cornstarch.models.feature_counts`, so :class:`MultimodalProcessor` expands each placeholder exactly);
- :func:`item_rows`: how many rows of a flat processor output (Qwen2-VL's ``pixel_values`` ``[patches, 1176]``)
  belong to each image, so the data layer can split a batch's output per sample and concatenate it again;
- :func:`cropped_images` and :func:`padded_images`: Pixtral's images, padded by its processor to the largest of
  each call, stored per sample without the padding and padded again to the largest of each batch.

How many pixels each image keeps (``min_pixels``/``max_pixels``, ``max_num_patches``, ``longest_edge``) is the
image processor's pixel budget: :mod:`cornstarch.models.pixel_budgets` reads and checks it, and counts an image's
features from its size alone.

Per family, the processor's outputs and the features per image:

- Qwen2-VL, Qwen2.5-VL: ``pixel_values`` ``[patches, C·t·p²]`` (all images' patches end to end) and
  ``image_grid_thw`` ``[images, 3]``; ``t·h·w / merge²`` features (the tower's patch merger kept).
- SigLIP2 NaFlex: ``pixel_values`` ``[images, max_patches, C·p²]``, ``pixel_attention_mask``, ``spatial_shapes``;
  ``h·w`` of ``spatial_shapes`` features (the valid patches; padding patches are dropped).
- Pixtral: ``pixel_values`` ``[images, C, H, W]`` (padded to the largest) and ``image_sizes`` ``[images, 2]``;
  ``(height // p) · (width // p)`` features.

Host synchronisation: these native towers read their grids on the host inside their ``forward`` (Qwen2-VL and
Qwen2.5-VL build rotary positions and attention windows from ``grid_thw.tolist()``; Pixtral loops over
``image_sizes``), and keeping SigLIP2's valid patches is a boolean selection whose size the host must learn. On an
accelerator each such forward waits for the device once; cornstarch adds no other synchronisation.

>>> from PIL import Image
>>> from transformers import Qwen2VLImageProcessorPil, Qwen2VLVisionConfig
>>> from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
>>> from cornstarch.models.multimodal_language_model import ModalEncoderModule
>>> tower = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(
...     depth=1, embed_dim=16, hidden_size=24, num_heads=2, mlp_ratio=1, patch_size=4))
>>> encoder = ModalEncoderModule(tower, projector=torch.nn.Linear(24, 8))  # the family's callbacks come by themselves
>>> processor = Qwen2VLImageProcessorPil(patch_size=4, size={"shortest_edge": 256, "longest_edge": 2304})
>>> out = processor(images=[Image.new("RGB", (32, 16)), Image.new("RGB", (8, 8))], return_tensors="pt")
>>> out["pixel_values"].shape, out["image_grid_thw"].tolist()  # patches end to end; (t, h, w) per image
(torch.Size([48, 96]), [[1, 4, 8], [1, 4, 4]])
>>> qwen2_vl_counts(tower.config, out), encoder(**out).shape  # 32 and 16 patches, merged 2×2
([8, 4], torch.Size([12, 8]))
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

__all__ = ["DYNAMIC_COUNTS", "cropped_images", "family_callbacks", "item_rows", "merged_patches", "padded_images",
           "pixtral_counts", "placeholder_item", "qwen2_vl_counts", "qwen2_vl_inputs", "siglip2_counts",
           "valid_patches"]


# ----------------------------------------------------------------------------------------------- callbacks
def qwen2_vl_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Preprocess callback of a Qwen2-VL / Qwen2.5-VL vision tower: the image processor's names → the tower's.

    ``pixel_values`` ``[patches, C·t·p²]`` becomes ``hidden_states`` and ``image_grid_thw`` ``[images, 3]`` becomes
    ``grid_thw``; both keys are declared (``input_names``), so :class:`MultimodalModel` routes them to this encoder.

    Args:
        inputs: the encoder's batch entries, with ``pixel_values`` and ``image_grid_thw``.

    Returns:
        ``{"hidden_states": ..., "grid_thw": ...}``, the tower's keyword arguments.

    Raises:
        ValueError: if ``image_grid_thw`` is missing.

    >>> out = qwen2_vl_inputs({"pixel_values": torch.zeros(8, 96), "image_grid_thw": torch.tensor([[1, 2, 4]])})
    >>> sorted(out), out["hidden_states"].shape
    (['grid_thw', 'hidden_states'], torch.Size([8, 96]))
    """
    if inputs.get("image_grid_thw") is None:
        raise ValueError("A Qwen2-VL vision tower needs image_grid_thw beside pixel_values (the image processor "
                         "returns both).")
    return {"hidden_states": inputs["pixel_values"], "grid_thw": inputs["image_grid_thw"]}


qwen2_vl_inputs.input_names = ("pixel_values", "image_grid_thw")


def merged_patches(inputs: dict[str, Any], output: Any) -> tuple[torch.Tensor]:
    """Postprocess callback of a Qwen2-VL / Qwen2.5-VL vision tower: its patch merger's output as the features.

    Args:
        inputs: the encoder's inputs (unused).
        output: the tower's output; ``pooler_output`` is ``[images' merged patches, out_hidden]``, image after image.

    Returns:
        ``(pooler_output,)``.
    """
    return (output.pooler_output,)


def valid_patches(inputs: dict[str, Any], output: Any) -> tuple[torch.Tensor]:
    """Postprocess callback of a SigLIP2 NaFlex tower: the features of the real patches only, image after image.

    The processor pads each image's patches to ``max_num_patches``; ``pixel_attention_mask`` marks the real ones,
    which come first in each row. Selecting them is one boolean indexing, whose size the host learns (a device sync
    on accelerators).

    Args:
        inputs: the encoder's inputs, with ``pixel_attention_mask`` ``[images, max_patches]``.
        output: the tower's output; element 0 ``[images, max_patches, hidden]``.

    Returns:
        ``([valid patches, hidden],)``.

    >>> hidden = torch.arange(6.).reshape(1, 3, 2)
    >>> valid_patches({"pixel_attention_mask": torch.tensor([[1, 1, 0]])}, (hidden,))[0].tolist()
    [[0.0, 1.0], [2.0, 3.0]]
    """
    return (output[0][inputs["pixel_attention_mask"].bool()],)


# model_type of the tower's config → ModalEncoderModule callbacks that feed it its processor's outputs.
_CALLBACKS: dict[str, dict[str, Callable]] = {
    "qwen2_vl_vision": {"preprocess_callback": qwen2_vl_inputs, "postprocess_module_callback": merged_patches},
    "qwen2_5_vl_vision": {"preprocess_callback": qwen2_vl_inputs, "postprocess_module_callback": merged_patches},
    "siglip2_vision_model": {"postprocess_module_callback": valid_patches},
}


def family_callbacks(model: Any) -> dict[str, Callable]:
    """The ``ModalEncoderModule`` callbacks a variable-resolution tower needs, by its config's ``model_type``.

    ``ModalEncoderModule(tower)`` applies them when given no callbacks; pass them explicitly to combine them with
    others: ``ModalEncoderModule(tower, **family_callbacks(tower))``.

    Args:
        model: the tower, or its config.

    Returns:
        Keyword arguments of ``ModalEncoderModule`` (``preprocess_callback``, ``postprocess_module_callback``);
        empty for towers that need none (Pixtral, and every fixed-size tower).

    >>> from transformers import Qwen2VLVisionConfig
    >>> sorted(family_callbacks(Qwen2VLVisionConfig()))
    ['postprocess_module_callback', 'preprocess_callback']
    >>> family_callbacks(object())
    {}
    """
    config = getattr(model, "config", model)
    return dict(_CALLBACKS.get(getattr(config, "model_type", None), {}))


# ----------------------------------------------------------------------------------------------- counts
def qwen2_vl_counts(config: Any, outputs: dict) -> list[int]:
    """Features per image (or per video, from ``video_grid_thw``) of a Qwen2-VL / Qwen2.5-VL tower with its merger:
    ``t·h·w / spatial_merge_size²``.

    >>> from transformers import Qwen2VLVisionConfig
    >>> qwen2_vl_counts(Qwen2VLVisionConfig(spatial_merge_size=2), {"image_grid_thw": torch.tensor([[1, 4, 8]])})
    [8]
    """
    name = "image_grid_thw" if "image_grid_thw" in outputs else "video_grid_thw"
    grid = torch.as_tensor(outputs[name])  # [items, 3]
    return (grid.prod(-1) // config.spatial_merge_size**2).tolist()


def siglip2_counts(config: Any, outputs: dict) -> list[int]:
    """Valid patches per image of a SigLIP2 NaFlex tower: ``h·w`` of each row of ``spatial_shapes``.

    >>> siglip2_counts(None, {"spatial_shapes": torch.tensor([[6, 9], [8, 8]])})
    [54, 64]
    """
    return torch.as_tensor(outputs["spatial_shapes"]).prod(-1).tolist()


def pixtral_counts(config: Any, outputs: dict) -> list[int]:
    """Patches per image of a Pixtral tower: ``(height // patch_size) · (width // patch_size)`` of ``image_sizes``.

    >>> from transformers import PixtralVisionConfig
    >>> pixtral_counts(PixtralVisionConfig(patch_size=4), {"image_sizes": torch.tensor([[20, 32], [8, 8]])})
    [40, 4]
    """
    sizes = torch.as_tensor(outputs["image_sizes"])  # [images, 2]
    return (sizes // config.patch_size).prod(-1).tolist()


# model_type of the encoder config → count function (config, processor outputs) → features per image.
DYNAMIC_COUNTS: dict[str, Callable[[Any, dict], list[int]]] = {
    "qwen2_vl_vision": qwen2_vl_counts,
    "qwen2_5_vl_vision": qwen2_vl_counts,
    "siglip2_vision_model": siglip2_counts,
    "pixtral": pixtral_counts,
}


def placeholder_item(config: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """One smallest zero image in the form a variable-resolution tower's processor gives it, or None for others.

    Used by :func:`cornstarch.models.dummy_inputs.dummy_inputs` (distributed ranks whose batch has no image).

    Args:
        config: the tower's config.
        device, dtype: where and in which floating type to make the pixels.

    Returns:
        Qwen2-VL / Qwen2.5-VL: one merge block (``pixel_values`` ``[merge², C·t·p²]``, ``image_grid_thw``);
        SigLIP2: one patch (``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``); Pixtral: one patch
        (``pixel_values`` ``[1, C, p, p]``, ``image_sizes``).

    >>> from transformers import PixtralVisionConfig
    >>> item = placeholder_item(PixtralVisionConfig(patch_size=4), torch.device("cpu"), torch.float32)
    >>> item["pixel_values"].shape, item["image_sizes"].tolist()
    (torch.Size([1, 3, 4, 4]), [[4, 4]])
    """
    model_type = getattr(config, "model_type", None)
    long = dict(device=device, dtype=torch.long)
    if model_type in ("qwen2_vl_vision", "qwen2_5_vl_vision"):
        merge = config.spatial_merge_size
        width = config.in_channels * config.temporal_patch_size * config.patch_size**2
        return {"pixel_values": torch.zeros(merge**2, width, device=device, dtype=dtype),
                "image_grid_thw": torch.tensor([[1, merge, merge]], **long)}
    if model_type == "siglip2_vision_model":
        width = config.num_channels * config.patch_size**2
        return {"pixel_values": torch.zeros(1, 1, width, device=device, dtype=dtype),
                "pixel_attention_mask": torch.ones(1, 1, **long), "spatial_shapes": torch.tensor([[1, 1]], **long)}
    if model_type == "pixtral":
        patch = config.patch_size
        return {"pixel_values": torch.zeros(1, config.num_channels, patch, patch, device=device, dtype=dtype),
                "image_sizes": torch.tensor([[patch, patch]], **long)}
    return None


# ----------------------------------------------------------------------------------------------- data layer
# A processor output with one row per patch → the output holding each item's (t, h, w) grid.
FLAT_OUTPUTS = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}


def item_rows(outputs: dict[str, Any]) -> dict[str, list[int]]:
    """Rows of each item in processor outputs that lay all items' patches end to end (Qwen2-VL's ``pixel_values``).

    Args:
        outputs: one processor call's outputs.

    Returns:
        Output name → rows per item (``t·h·w`` of its grid), for each flat output whose grid is present and whose
        row count is the grids' total, and each output with one row per frame beside ``video_frames`` (frames per
        video); other outputs are absent.

    >>> item_rows({"pixel_values": torch.zeros(24, 96), "image_grid_thw": torch.tensor([[1, 2, 4], [1, 4, 4]])})
    {'pixel_values': [8, 16]}
    """
    rows = {}
    frames = outputs.get("video_frames")  # videos as frames (cornstarch.models.video): rows per video
    if frames is not None:
        per_video = torch.as_tensor(frames).tolist()
        rows.update({name: per_video for name, value in outputs.items()
                     if name != "video_frames" and getattr(value, "ndim", 0) and value.shape[0] == sum(per_video)})
    for name, grid_name in FLAT_OUTPUTS.items():
        value, grid = outputs.get(name), outputs.get(grid_name)
        if value is None or grid is None:
            continue
        per_item = torch.as_tensor(grid).prod(-1).tolist()
        if value.ndim == 2 and value.shape[0] == sum(per_item):
            rows[name] = per_item
    return rows


# model_type of towers whose processor pads each call's images to the largest, with each image's size beside.
PADDED_FAMILIES = frozenset({"pixtral"})


def cropped_images(outputs: dict[str, Any]) -> list[np.ndarray]:
    """Each image of a padded ``pixel_values`` ``[images, C, H, W]`` without its padding, flattened (``C·h·w``).

    Args:
        outputs: a Pixtral-style processor's outputs: ``pixel_values`` and ``image_sizes`` ``[images, 2]``.

    Returns:
        One 1-D array per image; :func:`padded_images` undoes it for any batch of images.

    >>> pixels = torch.arange(2 * 1 * 2 * 3.).reshape(2, 1, 2, 3)
    >>> [c.tolist() for c in cropped_images({"pixel_values": pixels, "image_sizes": torch.tensor([[2, 3], [1, 2]])})]
    [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0]]
    """
    pixels = np.asarray(outputs["pixel_values"])
    sizes = np.asarray(outputs["image_sizes"]).tolist()
    return [image[:, :h, :w].reshape(-1) for image, (h, w) in zip(pixels, sizes)]  # data layer, on the CPU


def padded_images(flat: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Images cropped by :func:`cropped_images`, end to end, padded with zeros to the largest height and width.

    Args:
        flat: ``[Σ C·h·w]``, the images' pixels one after another.
        sizes: ``[images, 2]``, each image's ``(h, w)``.

    Returns:
        ``[images, C, max h, max w]``, what the processor returns for the same images in one call.

    >>> padded_images(np.arange(8.), np.array([[2, 3], [1, 2]]))[1].tolist()
    [[[6.0, 7.0, 0.0], [0.0, 0.0, 0.0]]]
    """
    sizes = np.asarray(sizes).reshape(-1, 2)
    areas = sizes.prod(-1)
    channels = flat.size // max(int(areas.sum()), 1)
    out = np.zeros((len(sizes), channels, *sizes.max(0)), dtype=flat.dtype)
    bounds = np.cumsum([0, *(areas * channels)])
    for i, (h, w) in enumerate(sizes.tolist()):  # data layer, on the CPU
        out[i, :, :h, :w] = flat[bounds[i]:bounds[i + 1]].reshape(channels, h, w)
    return out
