"""``MultimodalProjector``: maps an encoder's features to the language model's embedding width."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from .configuration_multimodal_language_model import MultimodalProjectorConfig


class MultimodalProjector(PreTrainedModel):
    """Maps encoder features ``[..., in_features]`` to the LLM's embedding width ``[..., out_features]``.

    Args:
        config: ``projection_type="linear"`` builds one ``nn.Linear``; ``"mlp"`` Linear → activation → Linear.
        projection: a module used as is instead of building one (its weights are kept).

    Raises:
        ValueError: if no ``projection`` is given and the config lacks ``in_features``/``out_features``.

    >>> cfg = MultimodalProjectorConfig(in_features=8, out_features=16, projection_type="mlp")
    >>> MultimodalProjector(cfg)(torch.zeros(2, 3, 8)).shape
    torch.Size([2, 3, 16])
    """

    config_class = MultimodalProjectorConfig
    base_model_prefix = "projector"
    main_input_name = "hidden_states"
    supports_gradient_checkpointing = False

    def __init__(self, config: MultimodalProjectorConfig, projection: nn.Module | None = None):
        super().__init__(config)
        if projection is None:
            self.projection = self._build(config)
        else:
            self.projection = nn.Identity()
        self.post_init()
        if projection is not None:  # set after post_init so the user's weights are not re-initialised
            self.projection = projection

    @staticmethod
    def _build(config: MultimodalProjectorConfig) -> nn.Module:
        if not isinstance(config.in_features, int) or not isinstance(config.out_features, int):
            raise ValueError(
                "MultimodalProjectorConfig needs integer in_features and out_features to build a projection "
                f"(got in_features={config.in_features!r}, out_features={config.out_features!r}); or pass "
                "projection=<your nn.Module>."
            )
        if config.projection_type == "linear":
            return nn.Linear(config.in_features, config.out_features)
        return nn.Sequential(
            nn.Linear(config.in_features, config.out_features),
            ACT2FN[config.activation],
            nn.Linear(config.out_features, config.out_features),
        )

    @property
    def is_custom(self) -> bool:
        """Whether the projection is a user module rather than one built from the config."""
        return not (isinstance(self.projection, nn.Linear) or isinstance(self.projection, nn.Sequential)
                    and len(self.projection) == 3 and all(isinstance(self.projection[i], nn.Linear) for i in (0, 2)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.projection(hidden_states)  # [..., out_features]

