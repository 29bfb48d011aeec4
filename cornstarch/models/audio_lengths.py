"""Clips of different lengths for Qwen2-Audio-style encoders: padded frames masked, each clip's features trimmed.

A Whisper-style feature extractor pads every clip to the encoder's fixed input length. Qwen2-Audio keeps, per
clip, only the features of its real frames: its processor returns ``feature_attention_mask`` (frames × clips),
the encoder's attention ignores padded frames, and each clip yields ``((L - 1) // 2 + 1 - 2) // 2 + 1`` features
for ``L`` real frames (a stride-2 convolution, then pooling by 2). The three pieces here do the same for a
:class:`~cornstarch.models.multimodal_language_model.ModalEncoderModule`:

>>> # ModalEncoderModule(qwen2_audio_encoder, preprocess_callback=AudioAttentionMask(),
>>> #                    postprocess_projector_callback=TrimAudioFeatures())
>>> # MultimodalProcessor({"audio": AudioFeaturesWithLengths(whisper_feature_extractor)}, tokenizer, model=...)
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoFeatureExtractor, BatchFeature
from transformers.masking_utils import create_bidirectional_mask

from .callbacks import ConfiguredCallback

MASK = "feature_attention_mask"


def frames_after_convolution(frames: torch.Tensor) -> torch.Tensor:
    """Frames after the encoder's stride-2 convolution (kernel 3, padding 1).

    >>> frames_after_convolution(torch.tensor([3000, 31])).tolist()
    [1500, 16]
    """
    return (frames - 1) // 2 + 1


def features_per_clip(frames: torch.Tensor) -> torch.Tensor:
    """Features a clip of ``frames`` real frames yields (convolution, then average pooling by 2).

    >>> features_per_clip(torch.tensor([3000, 31])).tolist()
    [750, 8]
    """
    return (frames_after_convolution(frames) - 2) // 2 + 1


class AudioAttentionMask(ConfiguredCallback):
    """``preprocess_callback``: the encoder's attention ignores each clip's padded frames.

    Builds, from ``feature_attention_mask`` ``[clips, frames]``, the mask transformers' own attention
    implementation of the encoder expects (``create_bidirectional_mask`` with the encoder's config), as
    ``Qwen2AudioForConditionalGeneration`` does, and gives it to the encoder as ``attention_mask``. Without
    ``feature_attention_mask`` every frame counts.

    >>> AudioAttentionMask().input_names
    frozenset({'feature_attention_mask'})
    """

    input_names = frozenset({MASK})

    def __init__(self) -> None:
        self._encoder: nn.Module | None = None

    def get_config(self) -> dict[str, Any]:
        return {}

    def attach(self, module: nn.Module) -> None:
        """Remember the encoder (its config names the attention implementation, its weights the dtype)."""
        self._encoder = module

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
        mask = inputs.get(MASK)
        if mask is None:
            return inputs
        if self._encoder is None:
            raise ValueError("AudioAttentionMask is not attached to an encoder; give it to a ModalEncoderModule.")
        features = inputs["input_features"]  # [clips, mel, frames]
        lengths = frames_after_convolution(mask.sum(-1))  # [clips]
        positions = (features.shape[-1] - 2) // 2 + 1  # the convolution's output length, as Qwen2-Audio computes it
        valid = (torch.arange(positions, device=lengths.device)[None] < lengths[:, None]).long()  # [clips, positions]
        dtype = next(self._encoder.parameters()).dtype
        shape_only = torch.zeros(features.shape[0], positions, 1, dtype=dtype, device=features.device)
        attention = create_bidirectional_mask(config=self._encoder.config, inputs_embeds=shape_only, attention_mask=valid)
        return {**inputs, "attention_mask": attention}


class TrimAudioFeatures(ConfiguredCallback):
    """``postprocess_projector_callback``: each clip's features for its real frames only, clip after clip.

    Reads ``feature_attention_mask``; without it every clip keeps all its features. On an accelerator the
    variable-size selection waits for the device once (as ``Qwen2AudioForConditionalGeneration`` does).

    >>> trim = TrimAudioFeatures()
    >>> mask = torch.tensor([[1] * 32, [1] * 12 + [0] * 20])
    >>> trim({"feature_attention_mask": mask}, (torch.zeros(2, 8, 4),))[0].shape  # 8 + 3 features
    torch.Size([11, 4])
    >>> trim.recount_features([8, 8], {"feature_attention_mask": mask})
    [8, 3]
    """

    input_names = frozenset({MASK})

    def get_config(self) -> dict[str, Any]:
        return {}

    def recount_features(self, counts: list[int], outputs: dict[str, Any]) -> list[int]:
        """Features per clip from the processor's ``feature_attention_mask`` (CPU, no model needed)."""
        mask = outputs.get(MASK)
        return counts if mask is None else features_per_clip(torch.as_tensor(mask).sum(-1)).tolist()

    def __call__(self, inputs: dict[str, Any], output: Any) -> tuple:
        features = output if isinstance(output, torch.Tensor) else output[0]  # [clips, max_features, hidden]
        mask = inputs.get(MASK)
        if mask is None:
            return (features,)
        lengths = features_per_clip(mask.sum(-1)).to(features.device)
        keep = torch.arange(features.shape[1], device=features.device)[None] < lengths[:, None]
        return (features[keep],)  # [sum of lengths, hidden]


class AudioFeaturesWithLengths:
    """An audio processor: a Whisper-style feature extractor padding every clip to the encoder's input length and
    returning which frames are real as ``feature_attention_mask`` (as ``Qwen2AudioProcessor`` calls it).

    Args:
        feature_extractor: e.g. a ``WhisperFeatureExtractor``.

    >>> from transformers import WhisperFeatureExtractor
    >>> import numpy as np
    >>> extract = AudioFeaturesWithLengths(WhisperFeatureExtractor(feature_size=16, sampling_rate=2560, hop_length=160,
    ...                                                           chunk_length=2, n_fft=400))
    >>> out = extract([np.zeros(1600, dtype="float32")], sampling_rate=2560, return_tensors="pt")
    >>> out["input_features"].shape, out["feature_attention_mask"].sum(-1).tolist()
    (torch.Size([1, 16, 32]), [10])
    """

    model_input_names = ["input_features", MASK]

    def __init__(self, feature_extractor: Any):
        self.feature_extractor = feature_extractor

    def __call__(self, audio: Any, sampling_rate: int | None = None, return_tensors: str | None = "pt") -> BatchFeature:
        out = self.feature_extractor(audio, sampling_rate=sampling_rate, return_attention_mask=True,
                                     padding="max_length", return_tensors=return_tensors)
        out[MASK] = out.pop("attention_mask")
        return out

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save the feature extractor (``AutoFeatureExtractor`` loads it back)."""
        self.feature_extractor.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "AudioFeaturesWithLengths":
        """Load what :meth:`save_pretrained` wrote."""
        return cls(AutoFeatureExtractor.from_pretrained(path))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.feature_extractor!r})"
