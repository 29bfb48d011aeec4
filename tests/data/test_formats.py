"""Readers of LLaVA / ShareGPT / messages rows: real-shaped rows become samples with the model's placeholder; each
bad row is an error naming the row and the field, or is skipped and counted."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from cornstarch.data import DatasetSpec, MultimodalDataModule
from cornstarch.data.formats import RowReader
from cornstarch.data.media import SampleError
from tests.data.llava_data import write_images, write_llava
from tests.data.test_collator import make


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": who, "value": text} for who, text in pairs]


@pytest.fixture
def root(tmp_path):
    write_images(str(tmp_path), 3)
    return tmp_path


def test_llava_multi_turn_several_images_and_placeholder_anywhere(root):
    reader = RowReader("llava", placeholder="<vision>", image_root=str(root))
    sample = reader({"images": ["images/0000000.png", "images/0000001.png"], "conversations": turns(
        ("system", "Be brief."), ("human", "Compare <image> with\n<image> please."), ("gpt", "Same."),
        ("human", "Sure?"), ("gpt", "Yes."))}, 0)
    assert sample["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compare <vision> with\n<vision> please."},
        {"role": "assistant", "content": "Same."}, {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."}]
    assert sample["images"] == [str(root / "images" / "0000000.png"), str(root / "images" / "0000001.png")]
    no_tag = reader({"image": "images/0000002.png", "conversations": turns(("human", "What?"), ("gpt", "A."))}, 1)
    assert no_tag["messages"][0]["content"] == "<vision>\nWhat?", "LLaVA puts an untagged row's image first"
    text_only = RowReader("sharegpt")({"conversations": turns(("user", "Hi"), ("assistant", "Hello"))}, 2)
    assert text_only == {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                         "images": []}


def test_messages_with_typed_parts(root):
    reader = RowReader("messages", image_root=str(root))
    sample = reader({"images": ["images/0000001.png"], "messages": [
        {"role": "user", "content": [{"type": "image", "image": "images/0000000.png"}, {"type": "text", "text": "and"},
                                     {"type": "image"}, {"type": "text", "text": "differ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Colours."}]}, 0)
    assert sample["messages"][0]["content"] == "<image> and <image> differ?"
    assert [m["content"] for m in sample["messages"][1:]] == ["Yes.", "Why?", "Colours."]
    assert sample["images"] == [str(root / "images" / "0000000.png"), str(root / "images" / "0000001.png")]


BAD_ROWS = [  # (row, field, message)
    ({"image": "images/missing.png", "conversations": turns(("human", "<image> x"), ("gpt", "y"))}, "image",
     "image file not found"),
    ({"image": "../outside.png", "conversations": turns(("human", "<image> x"), ("gpt", "y"))}, "image",
     "outside the image root"),
    ({"images": ["images/0000000.png", "/etc/passwd"], "conversations": turns(("human", "<image><image>"), ("gpt", "y"))},
     "images[1]", "outside the image root"),
    ({"conversations": turns(("human", "x"), ("bot", "y"))}, "conversations[1].from", "unknown speaker 'bot'"),
    ({"image": "images/0000000.png", "conversations": turns(("human", "<image> <image> x"), ("gpt", "y"))},
     "conversations", r"2 <image> in the turns but 1 image\(s\)"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]}, "conversations[0].value",
     "expected a string, got int"),
    ({"conversations": turns(("human", "x"))}, "conversations", "no assistant turn"),
    ({"id": 7}, "conversations", "expected a non-empty list of turns, got nothing"),
]


@pytest.mark.parametrize("row, field, message", BAD_ROWS)
def test_each_bad_row_names_the_row_and_field(root, row, field, message):
    with pytest.raises(SampleError, match=rf"Sample 12, field {re.escape(repr(field))}.*{message}"):
        RowReader("llava", image_root=str(root))(row, 12)


def test_bad_messages_rows_name_the_part(root):
    reader = RowReader("messages", image_root=str(root))
    with pytest.raises(SampleError, match=r"Sample 3, field 'messages\[0\].content\[1\].type': unknown part type 'video'"):
        reader({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "video"}]},
                             {"role": "assistant", "content": "y"}]}, 3)
    with pytest.raises(SampleError, match=r"Sample 4, field 'messages\[0\].content\[0\]': an image part with no source"):
        reader({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "y"}]}, 4)
    with pytest.raises(SampleError, match=r"Sample 5, field 'messages\[1\].role': unknown role 'bot'"):
        reader({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, 5)


def test_a_llava_json_trains_through_the_data_module_and_bad_rows_are_skipped_by_option(tmp_path, caplog):
    mllm, proc = make()
    path = write_llava(str(tmp_path), 12)
    rows = json.load(open(path))
    rows[5]["conversations"][0]["from"] = "narrator"
    rows[7]["image"] = "images/nowhere.png"
    json.dump(rows, open(path, "w"))
    spec = dict(path="json", data_files=path, format="llava")
    with pytest.raises(SampleError, match=r"Sample 5, field 'conversations\[0\].from': unknown speaker 'narrator'"):
        MultimodalDataModule(train=DatasetSpec(**spec), processor=proc).setup("fit")
    dm = MultimodalDataModule(train=DatasetSpec(**spec, on_bad_row="skip"), processor=proc, batch_size=5)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 10 and "skipped 2 of 12 rows" in caplog.text
    batches = list(dm.train_dataloader())
    assert [len(b["input_ids"]) for b in batches] == [5, 5]
    assert sum(int((b["input_ids"] == proc.token_ids["vision"]).any(1).sum()) for b in batches) > 0
    for batch in batches:
        assert torch.isfinite(mllm(**{k: v for k, v in batch.items() if k != "supervised_positions"}).loss)


@pytest.mark.parametrize("document", ["docs/data.md", "README.md"])
def test_the_documented_llava_config_parses_and_trains(tmp_path, document):
    """The "Bring your own data" config of docs/data.md and of the README, its paths pointed at a generated LLaVA
    set, through the CLI's parser (the data module's signature is the YAML schema)."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", document)).read()
    block = doc.split("## Bring your own data", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = write_llava(str(tmp_path), 8)
    text = (block.replace("data/llava_instruct.json", path).replace("data/llava_val.json", path)
            .replace("data/images", str(tmp_path)).replace("data/encoded", str(tmp_path / "encoded")))
    parser = ArgumentParser()
    parser.add_class_arguments(MultimodalDataModule, "data")
    dm = parser.instantiate_classes(parser.parse_object(yaml.safe_load(text))).data
    assert dm.specs["train"].format == "llava" and dm.cache_dir == str(tmp_path / "encoded")
    _, proc = make()
    dm.processor = proc
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and "pixel_values" in batch
