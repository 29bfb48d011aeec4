"""``forward`` never waits for the accelerator: no op in cornstarch's code needs a device value on the host.

On CPU, a ``TorchDispatchMode`` sees every aten op a training forward runs (and ``token_accuracy`` after it) and
records those that would make the host wait for an accelerator if the tensors lived there: reading a value
(``_local_scalar_dense``: ``.item()``, ``int()``, ``bool()``), ops whose output shape depends on values
(``nonzero``, ``masked_select``, ``unique``, boolean indexing, ``repeat_interleave`` without ``output_size``),
``equal``/``allclose``/``is_nonzero``, and tensors built from host data inside the forward (``lift_fresh``: on an
accelerator a blocking host-to-device copy). Each is attributed to the innermost Python frame outside torch;
those in ``cornstarch/`` fail the test. transformers' own code is outside the claim (its mask creation reads
whether the attention mask has padding) and is only listed.

The batch is what the data module gives on an accelerator: every tensor on the device, ``supervised_positions``
included. The count check's host branch (exact, for CPU tensors, by design) is switched to its accelerator branch
(``merging.on_host`` returns False), which is what runs on a device.

With a GPU, the same forward runs under ``torch.cuda.set_sync_debug_mode``: an error for any synchronising CUDA call
in cornstarch's encode + merge + loss pieces, and in the whole forward a warning located in cornstarch fails.
"""

from __future__ import annotations

import os
import traceback
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel, input_checks, merging
from cornstarch.models.multimodal_language_model.supervised_loss import supervised_positions, token_accuracy
from tests import tiny

TOKEN = tiny.VOCAB + 7
CORNSTARCH = os.path.dirname(os.path.abspath(merging.__file__)).rsplit(os.sep, 2)[0]  # .../cornstarch
SYNCING = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose", "masked_select",
           "_unique2", "unique_dim", "unique_consecutive", "lift_fresh"}


def syncs(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in SYNCING:
        return True
    if name == "index":  # boolean indices: the output's size depends on the values
        return any(t is not None and t.dtype == torch.bool for t in args[1])
    if name == "repeat_interleave":  # tensor repeats without output_size: the output's size depends on them
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    return False


class HostSyncSpy(TorchDispatchMode):
    """Records ``(op, file:line)`` of every op that would wait for an accelerator, by its innermost caller
    outside torch."""

    def __init__(self):
        super().__init__()
        self.ours: list[tuple[str, str]] = []
        self.theirs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if syncs(func, args, kwargs):
            frame = [f for f in traceback.extract_stack()[:-1]
                     if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__][-1]
            where = (func.overloadpacket.__name__, f"{frame.filename}:{frame.lineno}")
            (self.ours if frame.filename.startswith(CORNSTARCH) else self.theirs).append(where)
        return func(*args, **kwargs)


def model_and_batch(device: str = "cpu"):
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip")),
                            "audio": ModalEncoderModule(tiny.audio_model("whisper"))}, tiny.llm("llama"))
    mllm.set_modality_token_ids({"vision": TOKEN, "audio": TOKEN + 1})
    ids, mask = tiny.batch_with_placeholders(
        [[(TOKEN, 17), (TOKEN + 1, 16)], [(TOKEN, 17), (TOKEN, 17)], []], seq_len=96, pad_left=True)
    labels = ids.masked_fill(mask == 0, -100)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=tiny.pixels(3),
                 input_features=tiny.audio_features(1), supervised_positions=supervised_positions(labels))
    mllm.to(device).train()
    return mllm, {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("chunk", [None, 16], ids=["lm_head", "fused_chunked_loss"])
def test_training_forward_has_no_host_sync_in_cornstarch(monkeypatch, chunk):
    mllm, batch = model_and_batch()
    mllm.loss_chunk_size = chunk
    mllm(**batch)  # warm up lazily installed hooks before spying
    monkeypatch.setattr(merging, "on_host", lambda tensor: False)  # the accelerator branch of the count check
    with HostSyncSpy() as spy:
        out = mllm(**batch)
        token_accuracy(out, batch["labels"])
    assert spy.ours == [], f"cornstarch waits for the device at {spy.ours}"
    assert all(f"{os.sep}transformers{os.sep}" in where for _, where in spy.theirs), spy.theirs
    out.loss.backward()


def test_spy_sees_a_host_sync_in_cornstarch(monkeypatch):
    """The spy can fail: the count check's host branch (``torch.equal``, a tensor built from a list) and an
    ``.item()`` added to the merge are caught and located."""
    mllm, batch = model_and_batch()
    with HostSyncSpy() as spy:
        mllm(**batch)
    # on CPU tensors the exact checks read their results (free there): the count check and the vocabulary check
    assert {op for op, _ in spy.ours} == {"equal", "lift_fresh", "_local_scalar_dense"}
    assert all(where.startswith((merging.__file__, input_checks.__file__)) for _, where in spy.ours)

    embed = merging.merge_embeddings

    def merge_reading_a_count(input_ids, *args, **kwargs):
        assert (input_ids == TOKEN).sum().item() >= 0
        return embed(input_ids, *args, **kwargs)

    monkeypatch.setattr(merging, "on_host", lambda tensor: False)
    monkeypatch.setattr("cornstarch.models.multimodal_language_model.modeling_multimodal_language_model."
                        "merge_embeddings", merge_reading_a_count)
    with HostSyncSpy() as spy:
        mllm(**batch)
    # (code this test swaps in counts as the caller's: the ``.item()`` is located at the merge's call site)
    assert [op for op, _ in spy.ours] == ["_local_scalar_dense"]
    assert "modeling_multimodal_language_model.py" in spy.ours[0][1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.set_sync_debug_mode)")
def test_cuda_forward_has_no_synchronising_call_in_cornstarch():
    mllm, batch = model_and_batch("cuda")
    mllm(**batch)
    torch.cuda.synchronize()
    labels, positions = batch["labels"], batch["supervised_positions"]
    routed, _ = mllm.route_inputs({"pixel_values": batch["pixel_values"], "input_features": batch["input_features"]})
    out = mllm(**batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        embeds, _ = mllm.embed(batch["input_ids"], mllm.encode(routed), labels)  # encoders, projectors, merge
        token_accuracy(out, labels)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            mllm(**batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ours = [f"{w.filename}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message) and w.filename.startswith(CORNSTARCH)]
    assert ours == [], ours
    assert embeds.shape == (3, 96, 64) and positions.is_cuda
