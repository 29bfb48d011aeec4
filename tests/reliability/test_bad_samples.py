"""Bad samples, data files and paths: each error names the sample, field or file, and the fix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from datasets import Dataset

from cornstarch.data import MultimodalDataModule, SampleError
from cornstarch.data.collator import MultimodalCollator
from cornstarch.data.media import SampleWarning
from cornstarch.data.sources import DatasetSpec
from cornstarch.models.builder import PartSpec, ProcessorSpec, build_tokenizer
from tests import tiny
from tests.data.test_collator import CHAT_TEMPLATE, make, sample
from tests.data.test_datamodule import rows


# ----------------------------------------------------------------------------------------------- conversations
@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE], ids=["plain", "chat_template"])
@pytest.mark.parametrize("generate", [False, True])
def test_a_conversation_with_only_an_assistant_turn_names_the_sample(chat_template, generate):
    _, proc = make(chat_template=chat_template)
    lone = {"messages": [{"role": "assistant", "content": "seven"}], "__index__": 23}
    with pytest.raises(SampleError, match=r"Sample 23, field 'messages': turn 0 is the assistant's: an answer needs "
                                          r"a prompt before it"):
        MultimodalCollator(proc, generate=generate, padding_side="left" if generate else "right")([sample(0), lone])


def test_a_conversation_with_no_turns_names_the_sample():
    _, proc = make()
    with pytest.raises(SampleError, match=r"Sample 0, field 'messages': the conversation has no turns"):
        MultimodalCollator(proc, generate=True, padding_side="left")([{"messages": []}])


def test_a_system_prompt_before_the_answer_is_still_a_prompt():
    _, proc = make()
    batch = MultimodalCollator(proc)([{"messages": [{"role": "system", "content": "which digit ?"},
                                                    {"role": "assistant", "content": "seven"}]}])
    assert (batch["labels"] != -100).sum() == 2  # "seven" and </s>


# ----------------------------------------------------------------------------------------------- data files
def test_a_malformed_json_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "which digit ?", "answer": "seven"}\n'
                    '{"prompt": "which digit ?", "answer": "two"}\n'
                    '{"prompt": "which digit ?", "answer": }\n')
    with pytest.raises(ValueError, match=rf"{path}, line 3: malformed JSON \(Expecting value at column 39\); fix or "
                                         r"remove the record"):
        DatasetSpec("json", data_files=str(path)).load()


def test_a_malformed_json_document_names_the_file_and_line(tmp_path):
    good, bad = tmp_path / "a.json", tmp_path / "b.json"
    good.write_text('[{"prompt": "a", "answer": "b"}]')
    bad.write_text('[\n  {"prompt": "a", "answer": "b"},\n  {"prompt": "c" "answer": "d"}\n]\n')
    with pytest.raises(ValueError, match=rf"{bad}, line 3: malformed JSON \(Expecting ',' delimiter"):
        DatasetSpec("json", data_files={"train": [str(good), str(bad)]}).load()


def test_a_malformed_imagefolder_metadata_line_names_the_file_and_line(tmp_path):
    for name, image in zip(("a.png", "b.png"), tiny.pil_images(2)):
        image.save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "prompt": "which digit ?", "answer": "one"}\n'
                                             '{"file_name": "b.png", "prompt": "which digit ?" "answer": "two"}\n')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'metadata.jsonl'}, line 2: malformed JSON \(Expecting ',' "):
        DatasetSpec("imagefolder", data_dir=str(tmp_path)).load()


def test_well_formed_json_loads_as_before(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answer": "d"}\n')
    assert DatasetSpec("json", data_files=str(path)).load()["answer"] == ["b", "d"]


# ----------------------------------------------------------------------------------------------- paths
def test_a_missing_tokenizer_directory_is_named(tmp_path):
    missing = str(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match=rf"tokenizer: path '{missing}' does not exist"):
        build_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=r"tokenizer: path './no_such_tokenizer' does not exist"):
        build_tokenizer("./no_such_tokenizer")


def test_a_missing_processor_or_model_directory_is_named(tmp_path):
    missing = str(tmp_path / "clip")
    with pytest.raises(FileNotFoundError, match=rf"transformers.CLIPImageProcessor pretrained: path '{missing}' "
                                                r"does not exist"):
        ProcessorSpec("transformers.CLIPImageProcessor", pretrained=missing).build()
    with pytest.raises(FileNotFoundError, match=rf"LlamaForCausalLM pretrained: path '{missing}' does not exist"):
        PartSpec("transformers.LlamaForCausalLM", pretrained=missing).build()


def test_an_existing_tokenizer_directory_still_loads(tmp_path):
    tiny.tokenizer().save_pretrained(tmp_path / "tok")
    assert build_tokenizer(str(tmp_path / "tok")).get_vocab()["seven"] == tiny.tokenizer().get_vocab()["seven"]


# ----------------------------------------------------------------------------------------------- data module
@pytest.mark.parametrize("options", [dict(group_by_length=True), dict(max_length=200, on_too_long="skip")],
                         ids=["group_by_length", "skip"])
def test_raw_split_without_items_of_one_modality_is_measured(options):
    """An audio processor with image-only rows: lengths need no audio feature count."""
    _, proc = make(audio=True)
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(6)), processor=proc, batch_size=3, preprocess=False,
                              sampling_rate=tiny.AUDIO_RATE, **options)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert dm.lengths["train"] and batch["input_ids"].shape[0] == 3


def test_data_module_passes_on_long_audio():
    _, proc = make(audio=True)
    data = {"prompt": ["<audio> which digit ?"] * 2, "answer": ["seven", "two"],
            "audios": [[np.zeros(3 * tiny.AUDIO_RATE, np.float32)], [np.zeros(100, np.float32)]]}
    dm = MultimodalDataModule(train=Dataset.from_dict(data), processor=proc, sampling_rate=tiny.AUDIO_RATE,
                              on_long_audio="error")
    with pytest.raises(SampleError, match=r"Sample 0, field 'audios': audio item 0 lasts 3.00 s"):
        dm.setup("fit")
    dm = MultimodalDataModule(train=Dataset.from_dict(data), processor=proc, sampling_rate=tiny.AUDIO_RATE)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert any(issubclass(w.category, SampleWarning) and "Sample 0, field 'audios'" in str(w.message) for w in seen)
