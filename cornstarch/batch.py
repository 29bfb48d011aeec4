"""What a batch is: the keys every layer agrees on, and the label that supervises nothing.

The data layer produces these keys, :class:`~cornstarch.models.MultimodalModel` consumes the model inputs and the
Lightning module splits off the rest. Modality inputs (``pixel_values``, ``input_features``, …) are the encoders'
own argument names and are not listed here.

>>> IGNORE_INDEX, TEXT_KEYS
(-100, ('input_ids', 'attention_mask', 'labels'))
"""

IGNORE_INDEX = -100  # a label that supervises nothing (transformers' and torch's cross-entropy ignore_index)
TEXT_KEYS = ("input_ids", "attention_mask", "labels")  # [batch, seq] each
POSITION_IDS = "position_ids"  # [batch, seq]: restart per sample in packed rows
SUPERVISED_POSITIONS = "supervised_positions"  # [n]: flat positions whose next token is supervised (CPU-computed)
EVAL_KEYS = ("answers", "prompt_input_ids", "prompt_attention_mask")  # for generation, never model inputs
INDEX_KEY = "__index__"  # a sample's row in its dataset, so errors can name it
