"""The CLI round trip of a pretrained native model: a tiny Llava saved with its processor → ``model.from_hf`` in
YAML → ``cornstarch fit`` a few steps → ``cornstarch export --format hf`` → transformers' Auto classes load it
offline and give the trained module's logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

from cornstarch.demo import demo_tokenizer, digits_vlm_dataset
from cornstarch.lit.cli import main
from cornstarch.lit.module import MultimodalLitModule
from cornstarch.lit.optim import OptimizerConfig
from cornstarch.lit.schedule import Stage

DATASET = "cornstarch.demo:digits_vlm_dataset"
SCHEDULE = [{"name": "align", "start": 0, "unit": "step", "train": ["vision.projector"]},
            {"name": "finetune", "start": 1, "unit": "step", "train": ["vision.projector", "language_model"]}]
OPTIMIZER = {"lr": 1e-2, "schedule": "constant"}


def save_tiny_llava(directory: Path) -> None:
    """A Llava for the 8x8 digits (CLIP 2x2 patches, Llama) with its LlavaProcessor, as a hub checkpoint is."""
    tokenizer = demo_tokenizer(directory / "demo_tokenizer")  # the demo's 600-token BPE and chat template
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    llava = tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=8, patch_size=2),
        text_config=tf.LlamaConfig(vocab_size=608, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=image_token))
    image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=2,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=tokenizer.chat_template)
    llava.save_pretrained(directory)
    processor.save_pretrained(directory)


def write_config(tmp_path: Path, source: Path) -> Path:
    run = tmp_path / "run"
    config = {
        "seed_everything": 0,
        "model": {"from_hf": str(source), "freeze_schedule": SCHEDULE, "optimizer": OPTIMIZER,
                  "generation": {"max_new_tokens": 2, "exact_match": True}},
        "data": {"train": {"path": DATASET, "split": "train", "kwargs": {"image_size": 8, "n": 16}},
                 "val": {"path": DATASET, "split": "validation", "kwargs": {"image_size": 8, "n": 8}},
                 "batch_size": 8, "eval_batch_size": 8},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "max_epochs": 1, "limit_val_batches": 1,
                    "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(run),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True}}]},
    }
    path = tmp_path / "llava_finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_import_fit_export_hf_and_reload_with_auto_classes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tmp_path / "tiny_llava"
    save_tiny_llava(source)
    config = write_config(tmp_path, source)

    main(["fit", "--config", str(config)])
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    out = tmp_path / "exported"
    main(["export", "--config", str(config), "--ckpt_path", str(checkpoint), "--output_dir", str(out),
          "--format", "hf"])

    native = tf.AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = tf.AutoProcessor.from_pretrained(out)
    assert type(native) is tf.LlavaForConditionalGeneration and type(processor) is tf.LlavaProcessor
    module = MultimodalLitModule(from_hf=str(source), freeze_schedule=[Stage(**s) for s in SCHEDULE],
                                 optimizer=OptimizerConfig(**OPTIMIZER))
    module.load_state_dict(state["state_dict"])
    trained = module.model.eval()
    original = tf.LlavaForConditionalGeneration.from_pretrained(source).eval()

    rows = digits_vlm_dataset("validation", image_size=8, n=2)
    prompts = [processor.apply_chat_template(row["messages"][:1], add_generation_prompt=True) for row in rows]
    batch = processor(images=[row["images"][0] for row in rows], text=prompts, return_tensors="pt", padding=True,
                      padding_side="left")
    with torch.no_grad():
        expected = trained(**batch).logits
        assert (native(**batch).logits - expected).abs().max() <= 1e-5
        assert (original(**batch).logits - expected).abs().max() > 1e-3  # the fit changed the model
    greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(native.generate(**batch, **greedy), trained.generate(**batch, **greedy))


def test_from_hf_is_instead_of_the_parts(tmp_path):
    with pytest.raises(ValueError, match=r"from_hf imports the encoders, language model and tokenizer; do not list "
                                         r"\['tokenizer'\]"):
        MultimodalLitModule(from_hf=str(tmp_path), tokenizer="cornstarch.demo:demo_tokenizer")
    with pytest.raises(ValueError, match=r"Give \['encoders', 'language_model'\] \(or from_hf"):
        MultimodalLitModule(tokenizer="cornstarch.demo:demo_tokenizer")
    with pytest.raises(FileNotFoundError, match=r"from_hf: path '/nonexistent/llava' does not exist"):
        MultimodalLitModule(from_hf="/nonexistent/llava")
