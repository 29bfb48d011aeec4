"""Pixel budgets of the variable-resolution image processors, read and checked before any image is processed.

Each variable-resolution family's image processor resizes every image to fit a budget, in its own terms:

- Qwen2-VL / Qwen2.5-VL (``Qwen2VLImageProcessor``): ``min_pixels`` and ``max_pixels``, pixels per image after
  resizing both sides to multiples of ``patch_size · merge_size`` (transformers 5 stores them as
  ``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}``; both spellings are accepted);
- SigLIP2 NaFlex (``Siglip2ImageProcessor``): ``max_num_patches``, patches per image;
- Pixtral (``PixtralImageProcessor``): ``size={"longest_edge": N}``, pixels of an image's longer side.

Set them where the processor is configured: its constructor's keyword arguments, which a YAML config reaches as
``model.encoders.<key>.processor.kwargs`` (:class:`cornstarch.models.builder.ProcessorSpec`); or, per call, the
data module's ``processor_kwargs``. Each image then yields as many features as its resized grid holds, and the
feature counts of :mod:`cornstarch.models.dynamic_resolution` read that grid from the processor's outputs, so
length grouping, packing and ``max_length`` checks see the budgeted counts.

A budget smaller than one patch (one merged patch for Qwen2-VL) is silently overridden by the processor, which
still makes one patch (or merge block) per image; :func:`check_budget` refuses it, naming the field, as it
refuses a processor whose patch size differs from its tower's.

>>> from transformers import Qwen2VLImageProcessorPil
>>> processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, min_pixels=64, max_pixels=1024)
>>> pixel_budget(processor)
{'min_pixels': 64, 'max_pixels': 1024}
>>> check_budget("vision", processor, overrides={"max_pixels": 32})
Traceback (most recent call last):
    ...
ValueError: vision processor (Qwen2VLImageProcessorPil): max_pixels=32 is smaller than one merged patch, (patch_size 4 · merge_size 2)² = 64 pixels; the processor would still make 64-pixel images. Raise max_pixels to at least 64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from transformers.image_utils import ChannelDimension
from transformers.models.pixtral.image_processing_pil_pixtral import get_resize_output_image_size
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

__all__ = ["check_budget", "features_for_size", "pixel_budget"]

# Image processor class names (their PIL / torchvision / "Fast" variants included) → family.
_FAMILIES = {"Qwen2VLImageProcessor": "qwen2_vl", "Siglip2ImageProcessor": "siglip2",
             "PixtralImageProcessor": "pixtral"}


def _family(processor: Any) -> str | None:
    name = type(processor).__name__
    for suffix in ("Pil", "Fast"):
        name = name.removesuffix(suffix)
    return _FAMILIES.get(name)


def _entry(value: Any, name: str) -> Any:
    """``value[name]`` of a dict or transformers ``SizeDict`` (None when absent)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def _setting(processor: Any, overrides: Mapping[str, Any], name: str) -> Any:
    return overrides[name] if overrides.get(name) is not None else getattr(processor, name, None)


def _square(patch: Any) -> int | None:
    """A patch size given as an int or ``{"height": p, "width": p}`` → ``p`` (its height)."""
    return _entry(patch, "height") if patch is not None and not isinstance(patch, int) else patch


def pixel_budget(processor: Any, overrides: Mapping[str, Any] | None = None) -> dict[str, int] | None:
    """The budget a variable-resolution image processor resizes each image to, under its own field names.

    Args:
        processor: an image processor (``Qwen2VLImageProcessor``, ``Siglip2ImageProcessor``,
            ``PixtralImageProcessor``, in any backend).
        overrides: call-time keyword arguments that replace the processor's settings (``size``, ``min_pixels``,
            ``max_pixels``, ``max_num_patches``).

    Returns:
        ``{"min_pixels", "max_pixels"}`` (Qwen2-VL), ``{"max_num_patches"}`` (SigLIP2), ``{"longest_edge"}``
        (Pixtral); ``None`` for other processors.

    >>> from transformers import Siglip2ImageProcessorPil
    >>> pixel_budget(Siglip2ImageProcessorPil(max_num_patches=64)), pixel_budget(object()) is None
    ({'max_num_patches': 64}, True)
    """
    overrides = dict(overrides or {})
    family = _family(processor)
    if family == "qwen2_vl":
        size = _setting(processor, overrides, "size")
        low = overrides.get("min_pixels", _entry(size, "shortest_edge") or _entry(size, "min_pixels"))
        high = overrides.get("max_pixels", _entry(size, "longest_edge") or _entry(size, "max_pixels"))
        return {"min_pixels": low, "max_pixels": high}
    if family == "siglip2":
        return {"max_num_patches": _setting(processor, overrides, "max_num_patches")}
    if family == "pixtral":
        return {"longest_edge": _entry(_setting(processor, overrides, "size"), "longest_edge")}
    return None


def check_budget(key: str, processor: Any, config: Any = None, overrides: Mapping[str, Any] | None = None) -> None:
    """Refuse a budget smaller than one patch, or a processor whose patches are not its tower's.

    Args:
        key: the modality key, named in the error.
        processor: the modality's processor; processors without a pixel budget pass unchecked.
        config: the tower's config, to compare patch sizes with (skipped when ``None``).
        overrides: call-time keyword arguments of the processor (see :func:`pixel_budget`).

    Raises:
        ValueError: naming the modality, the processor and the field: ``max_pixels`` below one merged patch,
            ``min_pixels`` above ``max_pixels``, ``max_num_patches`` below 1, ``longest_edge`` below one patch,
            or ``patch_size`` / ``merge_size`` / ``temporal_patch_size`` unlike the tower's.

    >>> from transformers import PixtralImageProcessorPil, PixtralVisionConfig
    >>> check_budget("vision", PixtralImageProcessorPil(patch_size=16), PixtralVisionConfig(patch_size=16))
    >>> check_budget("vision", PixtralImageProcessorPil(patch_size=16), PixtralVisionConfig(patch_size=14))
    Traceback (most recent call last):
        ...
    ValueError: vision processor (PixtralImageProcessorPil): patch_size=16 but the tower's config has patch_size=14; features would not match the tower's patches. Set the processor's patch_size to 14.
    """
    budget = pixel_budget(processor, overrides)
    if budget is None:
        return
    overrides = dict(overrides or {})
    family = _family(processor)
    where = f"{key} processor ({type(processor).__name__})"
    patch = _square(_setting(processor, overrides, "patch_size"))

    def refuse(problem: str) -> None:
        raise ValueError(f"{where}: {problem}")

    if config is not None:
        pairs = {"patch_size": (patch, getattr(config, "patch_size", None))}
        if family == "qwen2_vl":
            pairs["merge_size"] = (_setting(processor, overrides, "merge_size"),
                                   getattr(config, "spatial_merge_size", None))
            pairs["temporal_patch_size"] = (_setting(processor, overrides, "temporal_patch_size"),
                                            getattr(config, "temporal_patch_size", None))
        for field, (mine, tower) in pairs.items():
            if mine is not None and tower is not None and mine != tower:
                tower_field = "spatial_merge_size" if field == "merge_size" else field
                refuse(f"{field}={mine} but the tower's config has {tower_field}={tower}; features would not match "
                       f"the tower's patches. Set the processor's {field} to {tower}.")
    if family == "qwen2_vl":
        merge = _setting(processor, overrides, "merge_size")
        block = (patch * merge) ** 2
        low, high = budget["min_pixels"], budget["max_pixels"]
        if high is not None and high < block:
            refuse(f"max_pixels={high} is smaller than one merged patch, (patch_size {patch} · merge_size "
                   f"{merge})² = {block} pixels; the processor would still make {block}-pixel images. Raise "
                   f"max_pixels to at least {block}.")
        if low is not None and high is not None and low > high:
            refuse(f"min_pixels={low} is larger than max_pixels={high}.")
    elif family == "siglip2":
        value = budget["max_num_patches"]
        if value is not None and value < 1:
            refuse(f"max_num_patches={value}: an image needs at least one patch; the processor would still make "
                   "one. Set max_num_patches to 1 or more.")
    elif family == "pixtral":
        value = budget["longest_edge"]
        if value is not None and patch is not None and value < patch:
            refuse(f"size.longest_edge={value} is smaller than one patch (patch_size {patch}); the processor would "
                   f"still make {patch}×{patch}-pixel images. Raise longest_edge to at least {patch}.")


def features_for_size(processor: Any, height: int, width: int,
                      overrides: Mapping[str, Any] | None = None) -> int | None:
    """Features an image of ``height × width`` pixels yields under its processor's budget, from its size alone.

    The resized size comes from transformers' own resize rules (Qwen2-VL's ``smart_resize``, SigLIP2's
    ``get_image_size_for_max_num_patches``, Pixtral's ``get_resize_output_image_size``), so no pixel is decoded
    or processed: the data layer measures a split's lengths from the images' headers.

    Args:
        processor: the modality's image processor.
        height, width: the image's size in pixels.
        overrides: call-time keyword arguments of the processor (see :func:`pixel_budget`).

    Returns:
        The tower's features for that image (Qwen2-VL: merged patches), or ``None`` when the size alone does not
        tell: another processor, resizing turned off, or an image the processor refuses (too elongated), which is
        then processed to raise its error.

    >>> from transformers import Qwen2VLImageProcessorPil
    >>> processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, min_pixels=64, max_pixels=1024)
    >>> features_for_size(processor, 16, 24), features_for_size(processor, 300, 400)  # 300×400 shrinks to 24×32
    (6, 12)
    """
    budget = pixel_budget(processor, overrides)
    overrides = dict(overrides or {})
    if budget is None or not _setting(processor, overrides, "do_resize"):
        return None
    family = _family(processor)
    patch = _square(_setting(processor, overrides, "patch_size"))
    try:
        if family == "qwen2_vl":
            merge = _setting(processor, overrides, "merge_size")
            h, w = smart_resize(height, width, factor=patch * merge, min_pixels=budget["min_pixels"],
                                max_pixels=budget["max_pixels"])
            return (h // patch) * (w // patch) // merge**2
        if family == "siglip2":
            h, w = get_image_size_for_max_num_patches(height, width, patch, budget["max_num_patches"])
            return (h // patch) * (w // patch)
        edge = budget["longest_edge"]
        if edge is None:
            return None
        shape = np.broadcast_to(np.uint8(0), (3, height, width))  # the image's shape, no pixels
        h, w = get_resize_output_image_size(shape, size=(edge, edge), patch_size=(patch, patch),
                                            input_data_format=ChannelDimension.FIRST)
    except ValueError:
        return None
    return (h // patch) * (w // patch) or None  # no patch: the processor refuses the image
