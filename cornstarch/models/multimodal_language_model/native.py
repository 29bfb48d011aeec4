"""Conversion to and from transformers' native multimodal classes (Llava, Llava-Next, Qwen2-Audio): the
``from_hf``/``to_hf`` entry points of :class:`MultimodalModel`; the conversions live in :mod:`cornstarch.models.hf`."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel


class NativeInterop:
    """``MultimodalModel.from_hf`` and ``MultimodalModel.to_hf`` (a mixin)."""

    @classmethod
    def from_hf(cls, source: Any, drop_unused_layers: bool = False, **from_pretrained_kwargs: Any) -> Any:
        """A model holding a transformers multimodal model's modules: Llava, Llava-Next or Qwen2-Audio.

        Its forward and ``generate`` take the native input names (``pixel_values``, ``image_sizes``,
        ``input_features``, ``feature_attention_mask``) and give the native logits; its components are the usual
        ``vision.module`` / ``vision.projector`` (``audio.…``) and ``language_model``. See :mod:`cornstarch.models.hf`.

        Args:
            source: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` or
                ``Qwen2AudioForConditionalGeneration`` (its modules are shared, not copied), or a directory (or hub
                id) one was saved to.
            drop_unused_layers: remove the vision layers after ``vision_feature_layer`` (faster; they never
                influence the output). A ``source`` instance shares its tower, so it loses those layers too.
            **from_pretrained_kwargs: for a directory, e.g. ``dtype=torch.bfloat16``.

        Returns:
            The model, with the native placeholder token id set for its modality.

        Raises:
            ValueError: for another class, or a part cornstarch cannot hold (named).

        >>> import transformers as tf
        >>> llava = tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        ...     vision_config=tf.CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=2,
        ...                                       num_attention_heads=2, image_size=8, patch_size=4),
        ...     text_config=tf.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        ...                                num_attention_heads=2, num_key_value_heads=1),
        ...     image_token_index=31))
        >>> from cornstarch.models import ModalEncoderModule, MultimodalModel
        >>> mllm = MultimodalModel.from_hf(llava)
        >>> mllm.component_names(), mllm.modality_token_ids
        (['vision.module', 'vision.projector', 'language_model'], {'vision': 31})
        >>> mllm.vision_encoder.module is llava.model.vision_tower  # shared, not copied
        True
        """
        from ..hf import model_from_hf

        return model_from_hf(source, drop_unused_layers=drop_unused_layers, **from_pretrained_kwargs)

    def to_hf(self) -> PreTrainedModel:
        """The transformers class with this model's modules (shared, not copied) and the same logits.

        Returns:
            A ``LlavaForConditionalGeneration`` (one vision encoder), ``LlavaNextForConditionalGeneration``
            (anyres callbacks, :mod:`cornstarch.models.anyres`) or ``Qwen2AudioForConditionalGeneration`` (a
            Qwen2-Audio encoder with :mod:`cornstarch.models.audio_lengths`' callbacks).

        Raises:
            ValueError: naming the part with no native equivalent: several encoders, a callback, a projector
                shape, an LM the class cannot hold, a modality token outside the LM's vocabulary.

        >>> import transformers as tf
        >>> clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=2,
        ...                                               num_attention_heads=2, image_size=8, patch_size=4))
        >>> llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=8,
        ...                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> from cornstarch.models import ModalEncoderModule, MultimodalModel
        >>> from cornstarch.models.feature_selection import SelectFeatures
        >>> vision = ModalEncoderModule(clip, postprocess_module_callback=SelectFeatures(layer=-2, strategy="default"))
        >>> mllm = MultimodalModel({"vision": vision}, llama, init_projector_type="mlp")
        >>> mllm.set_modality_token_ids({"vision": 31})
        >>> llava = mllm.to_hf()
        >>> type(llava).__name__, llava.config.vision_feature_layer, llava.config.image_token_id
        ('LlavaForConditionalGeneration', -2, 31)
        >>> MultimodalModel({"vision": ModalEncoderModule(clip)}, llama).to_hf()  # a linear projector
        Traceback (most recent call last):
        ...
        ValueError: The vision projector is a 'linear' projector; Llava holds a 'mlp' projector (Linear → activation → Linear).
        """
        from ..hf import model_to_hf

        return model_to_hf(self)
