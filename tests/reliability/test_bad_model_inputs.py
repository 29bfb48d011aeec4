"""Bad model inputs: raw pixels, ids outside the vocabulary, misaligned masks and labels, shared placeholder ids
and batches with nothing supervised give a clear error (naming the field and the fix) or a documented result."""

from __future__ import annotations

import warnings

import pytest
import torch

from cornstarch.data.collator import MultimodalCollator
from cornstarch.models.multimodal_language_model import MultimodalProcessor
from cornstarch.models.multimodal_language_model.input_checks import NO_TARGETS, check_vocabulary
from tests import tiny
from tests.data.test_collator import make, sample


@pytest.fixture(scope="module")
def model_and_batch():
    mllm, proc = make(audio=True)
    batch = MultimodalCollator(proc, sampling_rate=tiny.AUDIO_RATE)([sample(1), sample(2, "three two", n_audio=1)])
    return mllm, proc, batch


def test_uint8_pixel_values_are_refused_naming_the_field(model_and_batch):
    mllm, _, batch = model_and_batch
    raw = (batch["pixel_values"] * 60 + 128).clamp(0, 255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"pixel_values \(vision encoder\) has dtype torch.uint8, but the encoder "
                                         r"takes normalised floating-point values: run the vision image processor"):
        mllm(**{**batch, "pixel_values": raw})
    with pytest.raises(ValueError, match=r"input_features \(audio encoder\) has dtype torch.int16.*audio feature "
                                         r"extractor"):
        mllm(**{**batch, "input_features": batch["input_features"].to(torch.int16)})
    with pytest.raises(ValueError, match=r"pixel_values \(vision encoder\) has dtype torch.uint8"):
        mllm.generate(batch["input_ids"], pixel_values=raw, input_features=batch["input_features"], max_new_tokens=1)


@pytest.mark.parametrize("bad_id", [tiny.VOCAB + 40, -5])
def test_token_ids_outside_the_vocabulary_name_the_position(model_and_batch, bad_id):
    mllm, proc, batch = model_and_batch
    ids = batch["input_ids"].clone()
    column = int(batch["attention_mask"][1].sum()) - 2  # a text token (the answer's last word)
    ids[1, column] = bad_id
    message = (rf"input_ids\[1, {column}\] = {bad_id} is outside the language model's vocabulary of {tiny.VOCAB} tokens "
               rf"\(and no modality token: those are .*'vision': {proc.token_ids['vision']}.*\)\. The tokenizer does "
               r"not match the language model")
    with pytest.raises(ValueError, match=message):
        mllm(**{**batch, "input_ids": ids})
    with pytest.raises(ValueError, match=message):
        mllm.generate(ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                      input_features=batch["input_features"], max_new_tokens=1)


def test_out_of_vocabulary_check_on_accelerators_is_an_async_assertion():
    ids = torch.tensor([[1, 2, 200]])
    check_vocabulary(ids[:, :2], 128, {}, exact=False)  # in range: nothing to assert
    with pytest.raises(RuntimeError):  # torch._assert_async; on CPU it fails at once
        check_vocabulary(ids, 128, {}, exact=False)


@pytest.mark.parametrize("field,cut", [("attention_mask", 3), ("labels", 3), ("attention_mask", -2)])
def test_masks_and_labels_of_the_wrong_length_are_named(model_and_batch, field, cut):
    mllm, _, batch = model_and_batch
    value = batch[field][:, :-cut] if cut > 0 else torch.cat([batch[field], batch[field][:, :-cut]], 1)
    seq = batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"{field} has shape \[2, {seq - cut}\] but input_ids has \[2, {seq}\]: "
                                         r"pad .* to the same length \(MultimodalCollator does\)"):
        mllm(**{**batch, field: value})
    if field == "attention_mask":
        with pytest.raises(ValueError, match=rf"attention_mask has shape \[2, {seq - cut}\]"):
            mllm.generate(batch["input_ids"], attention_mask=value, pixel_values=batch["pixel_values"],
                          input_features=batch["input_features"], max_new_tokens=1)


def test_a_mask_for_another_batch_size_or_1d_ids_are_named(model_and_batch):
    mllm, _, batch = model_and_batch
    with pytest.raises(ValueError, match=r"attention_mask has shape \[1, \d+\] but input_ids has \[2, \d+\]"):
        mllm(**{**batch, "attention_mask": batch["attention_mask"][:1]})
    with pytest.raises(ValueError, match=r"input_ids has shape \[5\]; it must be \[batch, seq\]"):
        mllm(input_ids=torch.tensor([1, 5, 6, 7, 2]))


def test_two_modalities_cannot_share_a_token_id():
    mllm, proc = make(audio=True)
    with pytest.raises(ValueError, match=r"Modalities 'vision' and 'audio' have the same placeholder token id "
                                         rf"{proc.token_ids['vision']}"):
        mllm.set_modality_token_ids({"audio": proc.token_ids["vision"]})
    assert mllm.modality_token_ids == proc.token_ids, "a refused update changes nothing"
    processors = {"vision": tiny.image_processor("clip"), "audio": tiny.audio_processor()}
    with pytest.raises(ValueError, match=r"Modalities 'vision' and 'audio' have the same placeholder token id"):
        MultimodalProcessor(processors, tiny.tokenizer(), predefined_tokens={"vision": "<media>", "audio": "<media>"})
    with pytest.raises(ValueError, match=r"The 'audio' placeholder token id 2 is the tokenizer's eos token"):
        MultimodalProcessor(processors, tiny.tokenizer(), predefined_tokens={"audio": "</s>"})


# ----------------------------------------------------------------------------------------------- nothing supervised
def no_targets(batch: dict) -> dict:
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


@pytest.mark.parametrize("mode", ["train", "train_chunked", "eval"])
def test_a_batch_with_all_labels_ignored_has_loss_0_and_zero_gradients(model_and_batch, mode):
    mllm, _, batch = model_and_batch
    mllm.train(mode != "eval")
    mllm.loss_chunk_size = 4 if mode == "train_chunked" else None
    mllm.zero_grad()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = mllm(**no_targets(batch))
        out.loss.backward()
    finally:
        mllm.eval()
        mllm.loss_chunk_size = None
    assert out.loss.item() == 0.0
    grads = [p.grad for p in mllm.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads), "zero (and finite) gradients"
    assert any(NO_TARGETS in str(w.message) for w in seen), "said on the CPU, where it costs nothing"


def test_batches_with_targets_keep_their_loss_bit_for_bit(model_and_batch):
    mllm, _, batch = model_and_batch
    mllm.eval()
    with torch.no_grad():
        out = mllm(**batch)
        embeds, labels = mllm.embed(batch["input_ids"], mllm.encode(mllm.route_inputs(
            {k: batch[k] for k in ("pixel_values", "input_features")})[0]), batch["labels"])
        reference = mllm.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels)
    assert torch.equal(out.loss, reference.loss)
    mllm.train()
    try:
        out = mllm(**batch)
    finally:
        mllm.eval()
    assert type(out.loss.grad_fn).__name__ != "WhereBackward0", "the training loss is returned untouched"
    partly = {**batch, "labels": batch["labels"].clone()}
    partly["labels"][0] = -100  # one row without targets: the batch still has some
    with torch.no_grad():
        assert torch.isfinite(mllm(**partly).loss) and mllm(**partly).loss > 0


def test_nan_or_infinite_encoder_inputs_are_named(model_and_batch):
    mllm, _, batch = model_and_batch
    for name, key in (("pixel_values", "vision"), ("input_features", "audio")):
        for bad in (float("nan"), float("inf")):
            values = batch[name].clone()
            values.view(-1)[0] = bad
            with pytest.raises(ValueError, match=rf"{name} \({key} encoder\) holds NaN or infinite values"):
                mllm(**{**batch, name: values})
