"""The merge path: exact placement, labels, and no host synchronisation or per-sample loops."""

from __future__ import annotations

import pytest
import torch

from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from cornstarch.models.multimodal_language_model.merging import IGNORE_INDEX, merge_embeddings
from tests import tiny

TOKEN = tiny.VOCAB + 7


def test_features_land_in_order_and_labels_are_masked():
    embedding = torch.nn.Embedding(20, 4)
    ids = torch.tensor([[1, 30, 30, 2, 0], [30, 3, 31, 4, 5]])
    feats = {"vision": torch.arange(12.0).reshape(3, 4), "audio": torch.full((1, 4), -1.0)}
    labels = ids.clone()
    embeds, new_labels = merge_embeddings(ids, embedding, feats, {"vision": 30, "audio": 31}, labels)
    assert torch.equal(embeds[0, 1], feats["vision"][0])
    assert torch.equal(embeds[0, 2], feats["vision"][1])
    assert torch.equal(embeds[1, 0], feats["vision"][2])
    assert torch.equal(embeds[1, 2], feats["audio"][0])
    assert torch.equal(embeds[0, 0], embedding.weight[1])
    assert torch.equal(embeds[1, 3], embedding.weight[4])
    assert new_labels.tolist() == [[1, IGNORE_INDEX, IGNORE_INDEX, 2, 0], [IGNORE_INDEX, 3, IGNORE_INDEX, 4, 5]]
    assert torch.equal(labels, ids), "the caller's labels are not modified in place"


FORBIDDEN = ("item", "tolist", "cpu", "nonzero")


def test_forward_makes_no_host_sync_calls(monkeypatch):
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip")),
                            "audio": ModalEncoderModule(tiny.audio_model("whisper"))}, tiny.llm("llama"))
    mllm.set_modality_token_ids({"vision": TOKEN, "audio": TOKEN + 1})
    ids, mask = tiny.batch_with_placeholders(
        [[(TOKEN, 17), (TOKEN + 1, 16)], [(TOKEN, 17), (TOKEN, 17)], []], seq_len=96)
    labels = ids.masked_fill(mask == 0, -100)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=tiny.pixels(3),
                 input_features=tiny.audio_features(1))
    mllm(**batch)  # warm up lazily installed hooks before spying

    calls = []
    for name in FORBIDDEN:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, __name=name, __original=original, **kwargs):
            calls.append(__name)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append("torch.nonzero"))

    routed, _ = mllm.route_inputs({"pixel_values": batch["pixel_values"], "input_features": batch["input_features"]})
    features = mllm.encode(routed)
    embeds, _ = mllm.embed(ids, features, labels)
    assert calls == [], f"merge path called {calls}"
    assert embeds.shape == (3, 96, 64)


def test_spy_catches_item_in_merge(monkeypatch):
    """The spy above can fail: a merge that reads a count with .item() is caught."""
    calls = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append("item") or original(self))
    from cornstarch.models.multimodal_language_model import merging

    def bad_check(masks, features):
        for key, mask in masks.items():
            assert mask.sum().item() >= 0
    monkeypatch.setattr(merging, "check_counts", bad_check)
    merging.merge_embeddings(torch.tensor([[1, 5]]), torch.nn.Embedding(8, 2), {"v": torch.zeros(1, 2)}, {"v": 5})
    assert calls == ["item"]


@pytest.mark.parametrize("pad_left", [False, True])
def test_attention_mask_is_passed_unchanged(pad_left):
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("siglip"))}, tiny.llm("llama"))
    mllm.set_modality_token_ids({"vision": TOKEN})
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, 16)], []], seq_len=30, pad_left=pad_left)
    seen = {}
    mllm.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(mask=kwargs["attention_mask"]), with_kwargs=True)
    mllm(input_ids=ids, attention_mask=mask, pixel_values=tiny.pixels(1))
    assert seen["mask"] is mask
