"""Trainable components of a :class:`MultimodalModel`: their names, their parameters, and which of them train.

A component is the unit everything that decides "what trains" speaks of: ``mllm.train(encoders_mode=...)``, the
Lightning freeze schedule, per-component learning rates and the FSDP units (no unit mixes two components).

- ``"{key}.module"``: the encoder of modality ``key`` (e.g. ``vision.module``);
- ``"{key}.projector"``: its projector, with the parameters of its callbacks that are modules (Llava-Next's
  ``image_newline``);
- ``"language_model"``: the LM, without LoRA adapters;
- ``"lora"``: the LM's LoRA adapters, when there are any (parameters whose name holds ``lora_``).

>>> from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
>>> from cornstarch.models import ModalEncoderModule, MultimodalModel
>>> clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
...                                         num_attention_heads=2, image_size=8, patch_size=4))
>>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
...                                      num_attention_heads=2, num_key_value_heads=1))
>>> mllm = MultimodalModel({"vision": ModalEncoderModule(clip)}, llama)
>>> mllm.component_names()
['vision.module', 'vision.projector', 'language_model']
>>> mllm.set_trainable_components(["vision.projector"])
{'vision.module': False, 'vision.projector': True, 'language_model': False}
>>> mllm.train(llm_mode=True).trainable_components()
['vision.projector', 'language_model']
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

LORA_MARK = "lora_"  # peft names every LoRA adapter parameter lora_A / lora_B / lora_embedding_…
LANGUAGE_MODEL = "language_model"
LORA = "lora"


def _is_frozen(module: nn.Module) -> bool:
    """True if ``module`` has parameters and none of them requires a gradient."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


class TrainableComponents:
    """The component API of :class:`MultimodalModel` (a mixin: it needs ``encoders`` and ``language_model``)."""

    encoders: dict[str, Any]
    language_model: nn.Module

    def components(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Component name → its named parameters (names qualified in the model), in a fixed order: per encoder its
        module then its projector, then the language model, then ``lora`` when adapters exist.

        Returns:
            ``{"vision.module": [("vision_encoder.module.…", p), …], …, "language_model": […]}``.
        """
        parts: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for key, encoder in self.encoders.items():
            parts[f"{key}.module"] = list(encoder.module.named_parameters(prefix=f"{key}_encoder.module"))
            parts[f"{key}.projector"] = list(encoder.projector.named_parameters(prefix=f"{key}_encoder.projector"))
            for name, callback in encoder.callback_modules().items():
                parts[f"{key}.projector"] += list(callback.named_parameters(prefix=f"{key}_encoder.{name}"))
        lm = list(self.language_model.named_parameters(prefix=LANGUAGE_MODEL))
        parts[LANGUAGE_MODEL] = [(n, p) for n, p in lm if LORA_MARK not in n]
        adapters = [(n, p) for n, p in lm if LORA_MARK in n]
        if adapters:
            parts[LORA] = adapters
        return parts

    def component_names(self) -> list[str]:
        """The names :meth:`components` returns, in its order."""
        return list(self.components())

    def trainable_components(self) -> list[str]:
        """Components whose parameters all require a gradient."""
        return [name for name, params in self.components().items() if params and all(p.requires_grad for _, p in params)]

    def set_trainable_components(self, train: Iterable[str] | Mapping[str, bool]) -> dict[str, bool]:
        """Set which components train (``requires_grad``); frozen parts go to eval mode (no dropout).

        Args:
            train: component names that train, every other component is frozen; or a mapping name → trains,
                which changes only the components it names.

        Returns:
            Every component → whether it trains now. Each decision is logged (``INFO``), with parameter counts.

        Raises:
            ValueError: for a name that is no component of this model.
        """
        parts = self.components()
        wanted = dict(train) if isinstance(train, Mapping) else {name: True for name in train}
        unknown = [name for name in wanted if name not in parts]
        if unknown:
            raise ValueError(f"{unknown} is not a component of this model; components: {list(parts)}.")
        if not isinstance(train, Mapping):
            wanted = {name: name in wanted for name in parts}
        for name, trains in wanted.items():
            for _, p in parts[name]:
                p.requires_grad_(bool(trains))
        self._keep_frozen_parts_in_eval()
        state = {name: all(p.requires_grad for _, p in params) for name, params in parts.items() if params}
        for name, trains in state.items():
            log.info("%-24s %s (%d parameters)", name, "trains" if trains else "frozen",
                     sum(p.numel() for _, p in parts[name]))
        return state

    def train(self, mode: bool | Mapping[str, tuple[bool, bool]] = True,
              encoders_mode: Mapping[str, tuple[bool, bool]] | None = None, llm_mode: bool | None = None) -> Any:
        """``nn.Module.train``, plus freezing as the reference describes.

        ``mllm.train(encoders_mode={"vision": (module_trains, projector_trains)}, llm_mode=False)`` sets which
        components train (:meth:`set_trainable_components`): each named encoder's module and projector, and the LM
        with its adapters (``None``: unchanged). A part whose parameters are all frozen stays in eval mode (no
        dropout); the rest follow ``mode``.

        Raises:
            ValueError: for an unknown key in ``encoders_mode`` or a value that is not a pair of booleans.
        """
        if isinstance(mode, Mapping):
            mode, encoders_mode = True, mode
        changes: dict[str, bool] = {}
        for key, pair in (encoders_mode or {}).items():
            if key not in self.encoders:
                raise ValueError(f"train(encoders_mode=...) names {key!r}, which is no encoder; encoders: "
                                 f"{list(self.encoders)}.")
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(b, bool) for b in pair)):
                raise ValueError(f"encoders_mode[{key!r}] must be (module_trains: bool, projector_trains: bool), "
                                 f"got {pair!r}.")
            changes[f"{key}.module"], changes[f"{key}.projector"] = pair
        if llm_mode is not None:
            changes[LANGUAGE_MODEL] = bool(llm_mode)
            if LORA in self.components():
                changes[LORA] = bool(llm_mode)
        if changes:
            self.set_trainable_components(changes)
        nn.Module.train(self, mode)
        if mode:
            self._keep_frozen_parts_in_eval()
        return self

    def _keep_frozen_parts_in_eval(self) -> None:
        if not self.training:
            return
        for part in self.parts():
            part.train(not _is_frozen(part))

    def parts(self) -> list[nn.Module]:
        """The modules components live in: each encoder's module, projector and callback modules, then the LM."""
        parts: list[nn.Module] = []
        for encoder in self.encoders.values():
            parts += [encoder.module, encoder.projector, *encoder.callback_modules().values()]
        return parts + [self.language_model]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Turn on activation checkpointing in the LM and every encoder that supports it."""
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        for part in self.parts():
            if not getattr(part, "supports_gradient_checkpointing", False):
                continue
            if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5.2 name
                part.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Turn activation checkpointing off again."""
        for part in self.parts():
            if not getattr(part, "supports_gradient_checkpointing", False):
                continue
            if hasattr(part, "activation_checkpointing_disable"):
                part.activation_checkpointing_disable()
            else:
                part.gradient_checkpointing_disable()
