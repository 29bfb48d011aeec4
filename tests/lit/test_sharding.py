"""Wrap units and policies derived from the models (no process group needed), strategy registration, the FSDP1
run on a GPU (skipped without CUDA), rank-aware sampling and placeholder encoding of absent modalities."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from cornstarch.data.sampling import EpochShuffleSampler, LengthGroupedSampler
from cornstarch.lit.module import LoraSpec, MultimodalLitModule
from cornstarch.lit.schedule import Stage
from cornstarch.lit.sharding import (
    checkpointed_layers,
    fsdp1_policies,
    mixed_precision_policy,
    unit_components,
    wrap_units,
)
from cornstarch.lit.strategies import FSDP2Strategy, MultimodalFSDPStrategy, fill_adam_state
from cornstarch.models.dummy_inputs import dummy_inputs
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from tests import tiny
from tests.lit import distributed_run as dr


def test_units_follow_no_split_modules_and_components():
    model = dr.make_module().model
    units = wrap_units(model)
    names = [u.name for u in units]
    assert names == [
        "vision_encoder.module.embeddings", "vision_encoder.module.encoder.layers.0",
        "vision_encoder.module.encoder.layers.1", "vision_encoder.projector", "language_model.model.layers.0",
        "language_model.model.layers.1", "vision_encoder", "",
    ]
    assert model.vision_encoder.module not in [u.module for u in units]  # never the HF tower's root
    assert unit_components(model, units) == {
        **{n: {"vision.module"} for n in names if n.startswith("vision_encoder.module") or n == "vision_encoder"},
        "vision_encoder.projector": {"vision.projector"},
        "language_model.model.layers.0": {"language_model"}, "language_model.model.layers.1": {"language_model"},
        "": {"language_model"},  # the LM's tied embeddings/head and final norm
    }
    # activation checkpointing: the encoder and decoder layers, not the embeddings
    assert [type(m).__name__ for m in checkpointed_layers(units)] == ["CLIPEncoderLayer"] * 2 + ["LlamaDecoderLayer"] * 2


def test_lora_adapters_get_their_own_units():
    """LoRA adapters inside frozen decoder layers are split off, so no unit mixes frozen and trainable."""
    base = dr.make_module()
    module = MultimodalLitModule(encoders=base.hparams.encoders, language_model=base.hparams.language_model,
                                 tokenizer=base.hparams.tokenizer, lora=LoraSpec(r=2),
                                 freeze_schedule=[Stage(train=["vision.projector", "lora"])])
    units = wrap_units(module.model)
    owned = unit_components(module.model, units)
    assert all(len(c) == 1 for c in owned.values()), owned
    split = [u.name for u in units if u.kind == "split"]
    assert len(split) == 8 and all(".lora_A." in n or ".lora_B." in n for n in split)  # q,v × A,B × 2 layers
    for unit in units:
        grads = {p.requires_grad for p in unit.module.parameters(recurse=False)}
        assert len(grads) <= 1, unit.name


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_units_for_other_families(family):
    model = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model(family))}, tiny.llm("gpt2"))
    units = wrap_units(model)
    kinds = [type(u.module).__name__ for u in units if u.kind == "layer"]
    assert kinds.count("GPT2Block") == 2
    assert sum(k.endswith(("EncoderLayer", "Layer")) and k != "GPT2Block" for k in kinds) == 2, kinds


def test_fsdp1_policies_select_the_same_units():
    model = dr.make_module().model
    wrap, checkpointing, use_orig = fsdp1_policies(model)
    wrapped = wrap._run_policy(model, set(), {})
    assert {id(m) for m in wrapped} == {id(u.module) for u in wrap_units(model, root=False)}
    checkpointed = checkpointing._run_policy(model, set(), {})
    assert {type(m).__name__ for m in checkpointed} == {"CLIPEncoderLayer", "LlamaDecoderLayer"}
    assert use_orig is True


def test_fsdp1_refuses_a_schedule_that_changes_what_trains():
    strategy = MultimodalFSDPStrategy()
    with pytest.raises(ValueError, match="fsdp1.*fsdp2"):
        strategy._setup_model(dr.make_module())


def test_registered_strategy_names():
    trainer = L.Trainer(strategy="fsdp2", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    assert L.pytorch.strategies.StrategyRegistry["fsdp1"]["strategy"] is MultimodalFSDPStrategy


def test_mixed_precision_policy():
    assert mixed_precision_policy("bf16-mixed").reduce_dtype == torch.float32
    assert mixed_precision_policy("16-mixed").param_dtype == torch.float16
    assert mixed_precision_policy("32-true") is None and mixed_precision_policy("bf16-true") is None


def test_filled_adam_state_changes_no_update():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=0.1), torch.optim.AdamW(b.parameters(), lr=0.1)
    fill_adam_state(opt_b)
    assert len(opt_b.state) == 2
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(2):
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs a GPU (Lightning refuses it on CPU)")
def test_fsdp1_trains_on_gpu(tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    base = dr.make_module()
    module = MultimodalLitModule(encoders=base.hparams.encoders, language_model=base.hparams.language_model,
                                 tokenizer=base.hparams.tokenizer, projector_type="mlp")
    data = dr.MultimodalDataModule(train=dr.make_dataset(16, []), batch_size=4)
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=MultimodalFSDPStrategy(activation_checkpointing=True),
                        max_steps=2, logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    wrapped = [m for m in trainer.strategy.model.modules() if isinstance(m, FSDP)]
    assert len(wrapped) == len(wrap_units(module.model, root=False)) + 1


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("grouped", [False, True])
def test_ranks_together_see_the_single_process_batches(grouped):
    n, batch, ranks = 21, 3, 2
    lengths = [(i * 7) % 13 + 1 for i in range(n)]

    def sampler(**kw):
        if grouped:
            return LengthGroupedSampler(lengths, batch * kw.pop("per_rank", 1), group_size=2, seed=1, **kw)
        kw.pop("per_rank", None)
        return EpochShuffleSampler(n, seed=1, **kw)

    single = list(sampler(per_rank=ranks))  # one process, batch 6 (LengthGroupedSampler sizes its groups by it)
    shards = [list(sampler(num_replicas=ranks, rank=r)) for r in range(ranks)]
    assert len(shards[0]) == len(shards[1]) == 11  # padded by wrapping around: equal batch counts
    for step in range(n // (batch * ranks)):
        together = sorted(i for s in shards for i in s[step * batch:(step + 1) * batch])
        assert together == sorted(single[step * batch * ranks:(step + 1) * batch * ranks]), step
    assert sorted(set(shards[0]) | set(shards[1])) == list(range(n))


# ------------------------------------------------------------------------------------------------ absent modalities
def test_dummy_inputs_from_configs():
    clip = ModalEncoderModule(tiny.vision_model("clip"))
    assert dummy_inputs(clip)["pixel_values"].shape == (1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    whisper = ModalEncoderModule(tiny.audio_model("whisper"))
    assert dummy_inputs(whisper)["input_features"].shape == (1, tiny.MEL_BINS, 2 * tiny.AUDIO_POSITIONS)
    clip.dummy_inputs = {"pixel_values": torch.ones(1, 3, 4, 4)}
    assert dummy_inputs(clip)["pixel_values"].shape == (1, 3, 4, 4)

    class Custom(nn.Module):
        def forward(self, tokens):
            return tokens

    with pytest.raises(ValueError, match="Custom.*dummy_inputs"):
        dummy_inputs(ModalEncoderModule(Custom(), projector=nn.Linear(2, 2)))


def test_encode_absent_keeps_outputs_and_gives_zero_gradients():
    """A text-only batch with encode_absent: same logits; the vision parameters join the graph with zero grads."""
    torch.manual_seed(0)
    model = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, tiny.llm("llama"))
    model.set_modality_token_ids({"vision": tiny.VOCAB})
    ids = torch.randint(3, 60, (2, 9))
    plain = model(input_ids=ids, labels=ids)
    model.encode_absent = True
    kept = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(kept.logits, plain.logits, rtol=0, atol=0)
    kept.loss.backward()
    projector_grads = [p.grad for p in model.vision_encoder.projector.parameters()]
    assert all(g is not None and not g.any() for g in projector_grads)
    # with images the result is the same as without encode_absent
    pixels = tiny.pixels(1)
    ids = torch.tensor([[1, 5] + [tiny.VOCAB] * tiny.VISION_TOKENS["clip"] + [6]])
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits
        model.encode_absent = False
        b = model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_moe_experts_get_their_own_units():
    """A Mixtral's experts (one fused module per decoder layer) are units of their own inside their layer's unit."""
    from tests.models.multimodal_language_model import test_moe

    model = test_moe.model("mixtral")
    units = wrap_units(model)
    experts = [u.name for u in units if u.kind == "experts"]
    assert experts == [f"language_model.model.layers.{i}.mlp.experts" for i in range(2)]
    names = [u.name for u in units]
    for i in range(2):  # innermost first: the experts, then their layer
        assert names.index(f"language_model.model.layers.{i}.mlp.experts") < names.index(f"language_model.model.layers.{i}")
    assert all(len(c) == 1 for c in unit_components(model, units).values())
