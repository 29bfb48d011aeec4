"""Encoder callbacks with settings: objects a saved model names by class and settings, and rebuilds.

A callback of a :class:`~cornstarch.models.multimodal_language_model.ModalEncoderModule` can be a plain
module-level function, or an instance of a :class:`ConfiguredCallback` subclass when it needs settings (a layer
index, a grid of resolutions) or learned parameters (then it is an ``nn.Module`` too, and its parameters belong to
the model: trained with its projector, saved and loaded with it). Such an object may declare, as attributes:

- ``input_names``: batch entries routed to this encoder besides its ``forward``'s arguments (``image_sizes``);
- ``replaces_inputs`` (a preprocess callback): its ``input_names`` are the only entries routed to the encoder, the
  ``forward``'s arguments are built from them (a video's frames as an image tower's ``pixel_values``);
- ``encoder_kwargs``: keyword arguments added to the encoder call (``{"output_hidden_states": -2}``);
- ``count_features(n) -> n'``: how it changes each item's feature count (:mod:`cornstarch.models.feature_counts`);
- ``recount_features(counts, outputs) -> counts``: a count change that needs the processor outputs (image sizes);
- ``attach(module)``: called once with the encoder it serves (e.g. to read its attention implementation later).

>>> class Scale(ConfiguredCallback):
...     def __init__(self, factor: float = 2.0):
...         self.factor = factor
...     def get_config(self):
...         return {"factor": self.factor}
...     def __call__(self, inputs, output):
...         return (output[0] * self.factor,)
>>> Scale(3.0)
Scale(factor=3.0)
"""

from __future__ import annotations

from typing import Any


class ConfiguredCallback:
    """Base of callbacks with settings; subclasses set attributes in ``__init__`` and return them from
    :meth:`get_config` (JSON values), so that ``type(self)(**self.get_config())`` rebuilds the callback."""

    input_names: frozenset[str] = frozenset()

    @property
    def encoder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments this callback adds to the encoder call (none by default)."""
        return {}

    def get_config(self) -> dict[str, Any]:
        """The constructor's keyword arguments (JSON values)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({settings})"
