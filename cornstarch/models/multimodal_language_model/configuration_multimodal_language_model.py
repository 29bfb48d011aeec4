"""Configurations of the multimodal model: the projector's and the whole composite's."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig
from transformers.activations import ACT2CLS

PROJECTION_TYPES = ("linear", "mlp")


def validate_projection(projection_type: str, activation: str) -> None:
    """Raise a ``ValueError`` listing the valid choices if ``projection_type`` or ``activation`` is unknown.

    Args:
        projection_type: ``"linear"`` or ``"mlp"``.
        activation: a key of ``transformers.activations.ACT2CLS`` (used by ``mlp`` only, checked always).

    Raises:
        ValueError: naming the bad value and the valid ones.

    >>> validate_projection("mlp", "gelu")
    >>> validate_projection("conv", "gelu")
    Traceback (most recent call last):
    ...
    ValueError: Unknown projection_type 'conv'; valid types: linear, mlp.
    """
    if projection_type not in PROJECTION_TYPES:
        raise ValueError(f"Unknown projection_type {projection_type!r}; valid types: {', '.join(PROJECTION_TYPES)}.")
    if activation not in ACT2CLS:
        raise ValueError(
            f"Unknown activation {activation!r}; valid activations (transformers.activations.ACT2CLS): "
            f"{', '.join(sorted(ACT2CLS))}."
        )


class MultimodalProjectorConfig(PretrainedConfig):
    """Configuration of a :class:`MultimodalProjector`: encoder features → LLM embedding space.

    Args:
        in_features: width of the encoder features it receives (the encoder's ``hidden_size``/``d_model``).
        out_features: width of the LLM's input embeddings.
        projection_type: ``"linear"`` (one ``nn.Linear``) or ``"mlp"`` (Linear → activation → Linear).
        activation: any key of ``transformers.activations.ACT2CLS``; used by ``"mlp"``.
        initializer_range: std of the normal initialisation of the projection weights.

    Raises:
        ValueError: for an unknown ``projection_type`` or ``activation``.

    >>> cfg = MultimodalProjectorConfig(in_features=32, out_features=64, projection_type="mlp")
    >>> cfg.in_features, cfg.out_features, cfg.activation
    (32, 64, 'gelu')
    """

    model_type = "cornstarch_projector"

    def __init__(
        self,
        in_features: int | None = None,
        out_features: int | None = None,
        projection_type: str = "linear",
        activation: str = "gelu",
        initializer_range: float = 0.02,
        **kwargs: Any,
    ):
        validate_projection(projection_type, activation)
        self.in_features = in_features
        self.out_features = out_features
        self.projection_type = projection_type
        self.activation = activation
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


class MultimodalModelConfig(PretrainedConfig):
    """Everything needed to rebuild a :class:`MultimodalModel` from a directory.

    Built by ``MultimodalModel.config``; users rarely construct it by hand.

    Args:
        encoders: per modality key, a dict with ``model_class`` and ``config_class`` (import paths),
            ``config`` (the encoder's config as a dict), ``projector`` (the projector's config as a dict),
            ``callbacks`` (import paths of module-level callbacks, ``{"class_path", "config"}`` of callbacks with
            settings, or ``"<unserializable>"``) and ``dtype``.
        language_model: a dict with ``model_class``, ``config_class``, ``config`` and ``dtype``.
        modality_token_ids: the token id of each modality's placeholder, as set by the processor.
        encoder_order: the encoders' order (JSON configs sort keys; parameter order must survive a reload).
    """

    model_type = "cornstarch_multimodal"

    def __init__(
        self,
        encoders: dict[str, dict[str, Any]] | None = None,
        language_model: dict[str, Any] | None = None,
        modality_token_ids: dict[str, int] | None = None,
        encoder_order: list[str] | None = None,
        **kwargs: Any,
    ):
        self.encoders = dict(encoders or {})
        self.encoder_order = list(encoder_order or self.encoders)
        self.language_model = dict(language_model or {})
        self.modality_token_ids = dict(modality_token_ids or {})
        super().__init__(**kwargs)
