"""MultimodalLitModule: freeze schedule, exact resume, construction-time errors, the CLI and validation metrics.

Everything is tiny and built from configs (CLIP tower 8x8 images / 2x2 patches / hidden 32, Llama hidden 32, vocab
600) on the offline digits demo, on CPU.
"""

from __future__ import annotations

import contextlib
import re
import io
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from cornstarch.data.datamodule import DatasetSpec, MultimodalDataModule
from cornstarch.lit.cli import main
from cornstarch.lit.module import MultimodalLitModule
from cornstarch.lit.optim import OptimizerConfig, components_in
from cornstarch.lit.schedule import Stage
from cornstarch.models.builder import EncoderSpec, PartSpec, ProcessorSpec

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "digits_vlm.yaml"
TOKENIZER = "cornstarch.demo:demo_tokenizer"
DATASET = "cornstarch.demo:digits_vlm_dataset"
LM_LR = 5e-4
TRANSITION = 3  # the language model starts training at this global step
SCHEDULE = [Stage(train=["vision.module", "vision.projector"], start=0, name="align"),
            Stage(train=["vision.module", "vision.projector", "language_model"], start=TRANSITION, name="finetune")]


def vision_spec(**config) -> EncoderSpec:
    return EncoderSpec(
        model=PartSpec("transformers.CLIPVisionModel",
                       config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   image_size=8, patch_size=2, **config)),
        processor=ProcessorSpec("transformers.CLIPImageProcessor",
                                kwargs={"size": {"shortest_edge": 8}, "crop_size": {"height": 8, "width": 8}}),
        token="<image>",
    )


def lm_spec(**overrides) -> PartSpec:
    config = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    return PartSpec("transformers.LlamaForCausalLM", config=config, **overrides)


def make_module(**kwargs) -> MultimodalLitModule:
    defaults = dict(
        encoders={"vision": vision_spec()}, language_model=lm_spec(), tokenizer=TOKENIZER, projector_type="mlp",
        optimizer=OptimizerConfig(lr=1e-3, lr_groups={"language_model": LM_LR}, schedule="constant"),
        freeze_schedule=SCHEDULE,
    )
    defaults.update(kwargs)
    return MultimodalLitModule(**defaults)


def make_data(n_train: int = 64, n_val: int = 32, **kwargs) -> MultimodalDataModule:
    return MultimodalDataModule(
        train=DatasetSpec(DATASET, split="train", kwargs={"image_size": 8, "n": n_train}),
        val=DatasetSpec(DATASET, split="validation", kwargs={"image_size": 8, "n": n_val}),
        **{"batch_size": 8, **kwargs},
    )


def make_trainer(tmp_path, max_steps: int, limit_val_batches=0, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=limit_val_batches,
                     default_root_dir=str(tmp_path), callbacks=list(callbacks),
                     enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs)


# ------------------------------------------------------------------------------------------- 1. freeze schedule
class StageRecorder(Callback):
    """Per training step, after backward: requires_grad, grads, train mode and optimizer membership per component."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_after_backward(self, trainer, pl_module):
        parts = pl_module.model.components()
        optimizer = trainer.optimizers[0]
        lrs = {}
        for group in optimizer.param_groups:
            lrs.setdefault(group["name"].removesuffix(".no_decay"), set()).add(group["lr"])
        modules = {"language_model": pl_module.model.language_model,
                   "vision.module": pl_module.model.encoders["vision"].module,
                   "vision.projector": pl_module.model.encoders["vision"].projector}
        self.steps.append({
            "step": trainer.global_step,
            "stage": pl_module.stage_index,
            "requires_grad": {n: {p.requires_grad for _, p in ps} for n, ps in parts.items()},
            "has_grad": {n: any(p.grad is not None for _, p in ps) for n, ps in parts.items()},
            # (CLIP's post_layernorm only feeds the pooled output, which the projector does not use)
            "all_grad": {n: all(p.grad is not None for k, p in ps if p.requires_grad and "post_layernorm" not in k)
                         for n, ps in parts.items()},
            "in_optimizer": components_in(optimizer),
            "optimized_ids": {id(p) for g in optimizer.param_groups for p in g["params"]},
            "param_ids": {n: {id(p) for _, p in ps} for n, ps in parts.items()},
            "lrs": lrs,
            "training": {n: m.training for n, m in modules.items()},
            "lm_submodules_training": {m.training for m in pl_module.model.language_model.modules()},
        })


def test_freeze_schedule_per_stage(tmp_path):
    L.seed_everything(0, verbose=False)
    module = make_module()
    # Stage 0 is applied at construction.
    assert module.stage_index == 0
    assert not any(p.requires_grad for p in module.model.language_model.parameters())
    recorder = StageRecorder()
    trainer = make_trainer(tmp_path, max_steps=5, callbacks=[recorder])
    trainer.fit(module, datamodule=make_data(n_train=64))
    assert [s["step"] for s in recorder.steps] == list(range(5))
    for s in recorder.steps:
        stage = 0 if s["step"] < TRANSITION else 1
        assert s["stage"] == stage, s["step"]
        # vision parts train throughout, with the default lr
        for name in ("vision.module", "vision.projector"):
            assert s["requires_grad"][name] == {True}
            assert s["all_grad"][name] and s["has_grad"][name]
            assert name in s["in_optimizer"]
            assert s["lrs"][name] == {1e-3}
            assert s["training"][name]
        if stage == 0:
            assert s["requires_grad"]["language_model"] == {False}, s["step"]
            assert not s["has_grad"]["language_model"], s["step"]
            assert "language_model" not in s["in_optimizer"], s["step"]
            assert not (s["param_ids"]["language_model"] & s["optimized_ids"]), s["step"]
            # a frozen part runs in eval mode (no dropout), every submodule of it
            assert s["training"]["language_model"] is False
            assert s["lm_submodules_training"] == {False}
        else:
            assert s["requires_grad"]["language_model"] == {True}, s["step"]
            assert s["has_grad"]["language_model"] and s["all_grad"]["language_model"], s["step"]
            assert "language_model" in s["in_optimizer"], s["step"]
            assert s["param_ids"]["language_model"] <= s["optimized_ids"], s["step"]
            assert s["lrs"]["language_model"] == {LM_LR}, s["step"]
            assert s["training"]["language_model"] is True
            assert s["lm_submodules_training"] == {True}
    # No parameter is in the optimizer twice (the LM is added exactly once).
    optimizer = trainer.optimizers[0]
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------------------------------- 2. exact resume
class LossRecorder(Callback):
    def __init__(self):
        self.records: dict[int, torch.Tensor] = {}  # the loss of each step
        self.batches: dict[int, int] = {}  # a checksum of each step's batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # global_step has already been incremented by the optimizer step
        self.records[trainer.global_step - 1] = outputs["loss"].detach().clone()
        self.batches[trainer.global_step - 1] = int(batch["input_ids"].sum())


class BatchRecorder(Callback):
    """Per batch: global step, batch index, a checksum of the batch and the loss (several batches per step)."""

    def __init__(self):
        self.records: list[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records.append((trainer.global_step, batch_idx, int(batch["input_ids"].sum()), outputs["loss"].item()))


def _run(tmp_path, max_steps, ckpt_path=None, checkpoint=None, weights_only=None, schedule=SCHEDULE, n_train=64,
         optimizer=None, recorder=None, data=None, **trainer_kwargs):
    L.seed_everything(0, verbose=False)
    module = make_module(freeze_schedule=schedule, **({"optimizer": optimizer} if optimizer else {}))
    recorder = recorder or LossRecorder()
    callbacks = [recorder]
    if checkpoint == "step":
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1,
                                         save_top_k=-1))
    elif checkpoint == "epoch":
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_epochs=1,
                                         save_on_train_epoch_end=True, save_top_k=-1))
    elif checkpoint == "val":  # after each validation, as the experiments' ModelCheckpoint does
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1))
    trainer = make_trainer(tmp_path, max_steps=max_steps, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, datamodule=make_data(n_train=n_train, **(data or {})), ckpt_path=ckpt_path,
                weights_only=weights_only)
    module.recorder = recorder
    return recorder.records, module, trainer


def _check_resume(tmp_path, resume_step, steps, **kwargs):
    """Run ``steps`` steps with checkpoints, resume a second run from ``resume_step``: the same losses bit for bit,
    and the same parameters and optimizer state at the end."""
    a_losses, a_module, a_trainer = _run(tmp_path / "a", steps, **kwargs)
    assert sorted(a_losses) == list(range(steps))
    ckpt = tmp_path / "a" / "ckpt" / f"step={resume_step}.ckpt"
    assert ckpt.exists(), sorted(os.listdir(tmp_path / "a" / "ckpt"))
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["cornstarch_stage"] == 0
    kwargs.pop("checkpoint")
    # weights_only=False: see test_resume_with_default_checkpoint_loading for why it is needed
    b_losses, b_module, b_trainer = _run(tmp_path / "b", steps, ckpt_path=str(ckpt), weights_only=False, **kwargs)
    assert sorted(b_losses) == list(range(resume_step, steps))
    for step in range(resume_step, steps):
        assert b_module.recorder.batches[step] == a_module.recorder.batches[step], step  # the same batch
        assert torch.equal(b_losses[step], a_losses[step]), (step, b_losses[step].item(), a_losses[step].item())
    assert b_module.stage_index == 1
    for (name, pa), (_, pb) in zip(a_module.state_dict().items(), b_module.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert_same_optimizer_state(a_trainer.optimizers[0], b_trainer.optimizers[0])
    assert b_trainer.global_step == steps


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    """Identical param groups (names, learning rates) and per-parameter state (moments, step), bit for bit."""
    assert [(g["name"], g["lr"], len(g["params"])) for g in a.param_groups] == \
        [(g["name"], g["lr"], len(g["params"])) for g in b.param_groups]
    for ga, gb in zip(a.param_groups, b.param_groups):
        for pa, pb in zip(ga["params"], gb["params"]):
            sa, sb = a.state.get(pa, {}), b.state.get(pb, {})
            assert sa.keys() == sb.keys(), ga["name"]
            for key in sa:
                assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (ga["name"], key)


@pytest.mark.parametrize("data", [{"group_by_length": True}, {"pack": True, "max_length": 100, "batch_size": 2}],
                         ids=["grouped", "packed"])
def test_resume_is_exact_with_grouped_or_packed_batches(tmp_path, data):
    """Through Lightning, mid-epoch: length-grouped batches (64 digits, 8 steps an epoch) and packed rows (2 rows of
    100 tokens a step, about 11 steps an epoch): the resumed run trains the same batches, with the same losses,
    parameters and optimizer state."""
    _check_resume(tmp_path, resume_step=TRANSITION, steps=TRANSITION + 3, checkpoint="step", optimizer=COSINE,
                  data=data)


COSINE = OptimizerConfig(lr=1e-3, lr_groups={"language_model": LM_LR}, warmup_steps=2, schedule="cosine")
EPOCH_SCHEDULE = [Stage(train=["vision.module", "vision.projector"], start=0, unit="epoch"),
                  Stage(train=["vision.module", "vision.projector", "language_model"], start=2, unit="epoch")]


@pytest.mark.parametrize("checkpoint", ["step", "epoch"])
def test_resume_is_exact_at_epoch_boundary(tmp_path, checkpoint):
    """16 samples / batch 8 = 2 steps per epoch; the LM joins at epoch 2 (step 4). Resume from the end of epoch 1
    (step 4, still stage 0) reproduces steps 4..7 of the uninterrupted run bit for bit.

    ``checkpoint="step"`` saves after the epoch's last batch (on_train_batch_end), ``"epoch"`` in on_train_epoch_end.
    """
    _check_resume(tmp_path, resume_step=4, steps=8, checkpoint=checkpoint, schedule=EPOCH_SCHEDULE, n_train=16,
                  optimizer=COSINE)


@pytest.mark.parametrize("resume_step", [TRANSITION - 1, TRANSITION])
def test_resume_is_exact_mid_epoch(tmp_path, resume_step):
    """64 samples / batch 8: one epoch of 8 steps, so the step checkpoints are mid-epoch."""
    _check_resume(tmp_path, resume_step=resume_step, steps=8, checkpoint="step", optimizer=COSINE)


@pytest.mark.parametrize("val_check_interval, resume_step, n_train, schedule",
                         [(None, 4, 16, EPOCH_SCHEDULE), (3, 3, 64, SCHEDULE)], ids=["epoch-end", "mid-epoch"])
def test_resume_is_exact_from_validation_checkpoints(tmp_path, val_check_interval, resume_step, n_train, schedule):
    """Checkpoints taken after validation: at the end of epoch 1 (Lightning would hand the resumed epoch the next
    epoch's shuffle), and mid-epoch (it would restart the epoch's batches)."""
    _check_resume(tmp_path, resume_step=resume_step, steps=8, checkpoint="val", schedule=schedule,
                  n_train=n_train, optimizer=COSINE, limit_val_batches=1, val_check_interval=val_check_interval)


def test_resume_is_exact_with_gradient_accumulation(tmp_path):
    """40 samples / batch 8 = 5 batches = 3 optimizer steps per epoch with accumulate_grad_batches=2 (the last one
    from a single batch); resumed from step 4 (mid-epoch 1) the run trains the same batches with the same losses."""
    kwargs = dict(n_train=40, accumulate_grad_batches=2)
    whole, a_module, _ = _run(tmp_path / "a", 6, checkpoint="step", recorder=BatchRecorder(), **kwargs)
    assert len(whole) == 10 and [b[1] for b in whole] == [0, 1, 2, 3, 4] * 2
    resumed, b_module, _ = _run(tmp_path / "b", 6, ckpt_path=str(tmp_path / "a" / "ckpt" / "step=4.ckpt"),
                                weights_only=False, recorder=BatchRecorder(), **kwargs)
    assert resumed == whole[7:]  # batches 2..4 of epoch 1: steps 4, 5 (and the partial step 6)
    for (name, pa), (_, pb) in zip(a_module.state_dict().items(), b_module.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_resume_with_default_checkpoint_loading(tmp_path):
    _run(tmp_path / "a", 1, checkpoint="step")
    ckpt = tmp_path / "a" / "ckpt" / "step=1.ckpt"
    losses, _, trainer = _run(tmp_path / "b", 2, ckpt_path=str(ckpt))
    assert sorted(losses) == [1] and trainer.global_step == 2


# ------------------------------------------------------------------------------------------- 3. bad configurations
def test_unknown_component_in_freeze_schedule():
    with pytest.raises(ValueError, match=r"audio\.module.*components"):
        make_module(freeze_schedule=[Stage(train=["vision.projector", "audio.module"])])


def test_unknown_lr_group():
    with pytest.raises(ValueError, match=r"lr_groups.*langauge_model"):
        make_module(optimizer=OptimizerConfig(lr_groups={"langauge_model": 1e-4}))


def test_unknown_projector_type():
    with pytest.raises(ValueError, match=r"qformer.*linear, mlp"):
        make_module(projector_type="qformer")


def test_missing_pretrained_path(tmp_path):
    missing = str(tmp_path / "no_such_checkpoint")
    with pytest.raises((ValueError, OSError)) as info:
        make_module(language_model=PartSpec("transformers.LlamaForCausalLM", pretrained=missing))
    assert "no_such_checkpoint" in str(info.value)
    assert re.search(r"(?i)does not exist|not found|no such", str(info.value)), str(info.value)


def _printed_config(tmp_path) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert info.value.code in (0, None)
    config = yaml.safe_load(out.getvalue())
    assert config["model"]["freeze_schedule"][1]["start"] == 20
    return config


def _tiny_config(tmp_path) -> Path:
    """The experiment's printed config, shrunk and pointed into tmp_path (no RichProgressBar)."""
    config = _printed_config(tmp_path)
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(tmp_path / "run")
    trainer["logger"] = False
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("RichProgressBar")
                            and not c["class_path"].endswith("LearningRateMonitor")]
    for cb in trainer["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(tmp_path / "run" / "checkpoints")
    trainer["enable_progress_bar"] = False
    trainer["enable_model_summary"] = False
    path = tmp_path / "printed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_nonexistent_ckpt_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nonexistent.ckpt.*does not exist"):
        main(["fit", "--config", str(CONFIG), "--ckpt_path", "/nonexistent.ckpt"])


# ------------------------------------------------------------------------------------------- 4. CLI round trip
def test_cli_print_config_fit_and_export(tmp_path, monkeypatch):
    from cornstarch.models.multimodal_language_model import MultimodalModel, MultimodalProcessor

    monkeypatch.chdir(tmp_path)
    config = _tiny_config(tmp_path)
    small = ["--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
             "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
             "--data.train.kwargs.n", "16", "--data.val.kwargs.n", "8", "--data.batch_size", "8",
             "--data.eval_batch_size", "8"]
    main(["fit", "--config", str(config), *small])
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert ckpts, list((tmp_path / "run").rglob("*"))
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    out = tmp_path / "exported"
    main(["export", "--config", str(CONFIG), "--ckpt_path", str(ckpts[-1]), "--output_dir", str(out)])
    assert (out / "config.json").exists()

    # The exported directory loads back and gives the trained module's logits.
    module = MultimodalLitModule(**{k: v for k, v in _module_kwargs(config).items()})
    module.load_state_dict(state["state_dict"])
    module.eval()
    model = MultimodalModel.from_pretrained(str(out)).eval()
    processor = MultimodalProcessor.from_pretrained(str(out))
    from cornstarch.demo import digits_vlm_dataset

    row = digits_vlm_dataset("validation", image_size=8, n=2)[0]
    batch = make_data(8, 8)
    batch.processor = processor
    batch.setup()
    inputs, _ = MultimodalLitModule._split(next(iter(batch.val_dataloader())))
    with torch.no_grad():
        expected = module.model(**inputs).logits
        got = model(**inputs).logits
    assert row["images"][0].size == (8, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert processor.tokenizer.get_vocab() == module.processor.tokenizer.get_vocab()
    assert processor.token_ids == module.processor.token_ids


def test_cli_resume_with_ckpt_path_last(tmp_path, monkeypatch):
    """``cornstarch fit --ckpt_path last`` after a 2-step run continues to step 4 exactly as an uninterrupted
    4-step run: the same parameters and optimizer state at step 4, bit for bit."""
    monkeypatch.chdir(tmp_path)
    small = ["--trainer.max_epochs", "3", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
             "--data.train.kwargs.n", "16", "--data.val.kwargs.n", "8", "--data.batch_size", "8",
             "--data.eval_batch_size", "8"]  # 2 steps an epoch, validation (and last.ckpt) at each epoch's end

    def fit(run: str, steps: int, *extra: str, saves: str = "steps") -> Path:
        (tmp_path / run).mkdir(exist_ok=True)
        config = _tiny_config(tmp_path / run)
        cfg = yaml.safe_load(config.read_text())
        cfg["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
            "dirpath": str(tmp_path / run / saves), "filename": "{step}", "every_n_train_steps": 1,
            "save_top_k": -1}})
        config.write_text(yaml.safe_dump(cfg))
        main(["fit", "--config", str(config), *small, "--trainer.max_steps", str(steps), *extra])
        return tmp_path / run

    whole = fit("a", 4)
    part = fit("b", 2)
    last = part / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    fit("b", 4, "--ckpt_path", "last", saves="resumed")
    assert sorted(p.name for p in (part / "resumed").iterdir()) == ["step=3.ckpt", "step=4.ckpt"]  # not from 0
    want = torch.load(whole / "steps" / "step=4.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(part / "resumed" / "step=4.ckpt", map_location="cpu", weights_only=False)
    assert got["global_step"] == want["global_step"] == 4
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for name, tensor in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
    (opt_got,), (opt_want,) = got["optimizer_states"], want["optimizer_states"]
    assert opt_got["state"].keys() == opt_want["state"].keys() and opt_want["state"]
    for index, state in opt_want["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(opt_got["state"][index][key]), torch.as_tensor(value)), (index, key)
    assert [g["lr"] for g in opt_got["param_groups"]] == [g["lr"] for g in opt_want["param_groups"]]


def _module_kwargs(config_path: Path) -> dict:
    """MultimodalLitModule arguments from a printed config (dataclass specs rebuilt from plain dicts)."""
    cfg = yaml.safe_load(config_path.read_text())["model"]

    def part(d):
        return PartSpec(**d)

    encoders = {k: EncoderSpec(**{**v, "model": part(v["model"]), "processor": ProcessorSpec(**v["processor"])})
                for k, v in cfg["encoders"].items()}
    return dict(encoders=encoders, language_model=part(cfg["language_model"]), tokenizer=cfg["tokenizer"],
                projector_type=cfg["projector_type"], projector_activation=cfg["projector_activation"],
                optimizer=OptimizerConfig(**cfg["optimizer"]),
                freeze_schedule=[Stage(**s) for s in cfg["freeze_schedule"]])


# ------------------------------------------------------------------------------------------- 5. validation metrics
def test_validation_logs_exact_match_and_perplexity(tmp_path):
    L.seed_everything(0, verbose=False)
    module = make_module()
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=2)
    results = trainer.validate(module, datamodule=make_data(n_train=16, n_val=16), verbose=False)
    metrics = results[0]
    assert "val/exact_match" in metrics and "val/perplexity" in metrics, metrics
    assert 0.0 <= metrics["val/exact_match"] <= 1.0
    assert torch.isfinite(torch.tensor(metrics["val/perplexity"]))
    assert metrics["val/perplexity"] > 1.0
    assert metrics["val/perplexity"] == pytest.approx(torch.exp(torch.tensor(metrics["val/epoch_loss"])).item(),
                                                      rel=1e-5)
    # also logged by fit's validation
    trainer = make_trainer(tmp_path / "fit", max_steps=1, limit_val_batches=1)
    trainer.fit(make_module(), datamodule=make_data(n_train=8, n_val=8))
    assert 0.0 <= float(trainer.callback_metrics["val/exact_match"]) <= 1.0
    assert "val/perplexity" in trainer.callback_metrics


def test_validate_then_fit_same_module(tmp_path):
    module = make_module()
    make_trainer(tmp_path, max_steps=1, limit_val_batches=1).validate(module, datamodule=make_data(8, 8), verbose=False)
    trainer = make_trainer(tmp_path / "fit", max_steps=1, limit_val_batches=1)
    trainer.fit(module, datamodule=make_data(n_train=8, n_val=8))
    assert "val/exact_match" in trainer.callback_metrics


def test_cli_export_accepts_printed_fit_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _tiny_config(tmp_path)
    main(["export", "--config", str(config), "--output_dir", str(tmp_path / "exported")])
    from cornstarch.models.multimodal_language_model import MultimodalModel, MultimodalProcessor

    # no checkpoint: the config's freshly built model (seed_everything: 0), weights and processor
    L.seed_everything(0, verbose=False)
    module = MultimodalLitModule(**_module_kwargs(config))
    exported = MultimodalModel.from_pretrained(str(tmp_path / "exported"))
    want = module.model.state_dict()
    assert exported.state_dict().keys() == want.keys()
    assert all(torch.equal(t, want[k]) for k, t in exported.state_dict().items())
    processor = MultimodalProcessor.from_pretrained(str(tmp_path / "exported"))
    assert processor.token_ids == module.processor.token_ids == exported.modality_token_ids


def test_image_audio_experiment_parses_and_builds():
    """experiments/digits_valm.yaml is a valid config whose model has both encoders wired to the processor."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(CONFIG.parent / "digits_valm.yaml"), "--print_config"])
    assert info.value.code in (0, None)
    config = yaml.safe_load(out.getvalue())
    assert set(config["model"]["encoders"]) == {"vision", "audio"}
    assert config["data"]["train"]["path"] == "cornstarch.demo:digits_valm_dataset"


@pytest.mark.parametrize("recipe", sorted((CONFIG.parent / "gpu").glob("*.yaml")), ids=lambda p: p.stem)
def test_gpu_recipes_print_config_offline(recipe):
    """GPU recipes name hub checkpoints; --print_config parses them without building (or downloading) anything."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert info.value.code in (0, None)
    config = yaml.safe_load(out.getvalue())
    model = config["model"]
    assert model["from_hf"] or model["language_model"]["pretrained"]  # a native checkpoint, or the parts'
    assert [s["name"] for s in model["freeze_schedule"]] == ["align", "finetune"]
    callbacks = {c["class_path"]: c["init_args"] for c in config["trainer"]["callbacks"]}
    checkpoint = callbacks["cornstarch.lit.checkpointing.Checkpoint"]  # mid-epoch, for long epochs
    assert checkpoint["every_n_train_steps"] > 0 and checkpoint["save_last"] is True


def test_lora_trains_adapters_only_and_exports_merged(tmp_path):
    from cornstarch.lit import LoraSpec
    from cornstarch.lit.cli import CornstarchTrainer
    from cornstarch.models.multimodal_language_model import MultimodalModel

    schedule = [Stage(["vision.projector", "lora"], start=0)]
    module = make_module(lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), freeze_schedule=schedule,
                         optimizer=OptimizerConfig(lr=1e-2, schedule="constant"))
    parts = module.model.components()
    assert "lora" in parts and all("lora_" in n for n, _ in parts["lora"])
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(module, make_data())
    after = dict(module.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n or ".projector." in n for n in changed), sorted(changed)[:5]
    assert any("lora_B" in n for n in changed), "adapters learned"

    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    again = make_module(lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), freeze_schedule=schedule)
    again.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])  # projector + adapters together
    data = make_data()
    data.processor = module.processor
    batch = next(iter(data.train_dataloader()))
    module.eval(), again.eval()
    with torch.no_grad():
        expected = module.model(**batch).logits
        assert torch.equal(again.model(**batch).logits, expected)
        CornstarchTrainer(logger=False).export(again, output_dir=str(tmp_path / "exported"))
        merged = MultimodalModel.from_pretrained(tmp_path / "exported").eval()
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- 7. MoE from YAML
MIXTRAL_YAML = """
class_path: transformers.MixtralForCausalLM
config:
  vocab_size: 600
  hidden_size: 32
  intermediate_size: 32
  num_hidden_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  num_local_experts: 4
  num_experts_per_tok: 2
  output_router_logits: true      # return the router logits: the router loss joins the training loss
  router_aux_loss_coef: 0.02      # its weight
  max_position_embeddings: 128
  pad_token_id: 0
  bos_token_id: 1
  eos_token_id: 2
"""


def test_moe_router_loss_coefficient_from_yaml_and_router_load_logged(tmp_path, monkeypatch):
    """A Mixtral LM set up in the experiment YAML (``output_router_logits``, ``router_aux_loss_coef``) trains with
    that coefficient; the router's loss and per-expert token shares are logged each step; perplexity uses the
    cross-entropy alone."""
    from cornstarch.lit.cli import CornstarchCLI, CornstarchTrainer

    monkeypatch.chdir(tmp_path)
    path = _tiny_config(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["model"]["language_model"] = yaml.safe_load(MIXTRAL_YAML)
    config = {k: v for k, v in config.items() if k in ("seed_everything", "model", "data", "trainer")}
    path.write_text(yaml.safe_dump(config))
    small = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
             "--trainer.log_every_n_steps", "1", "--data.train.kwargs.n", "16", "--data.val.kwargs.n", "8",
             "--data.batch_size", "8", "--data.eval_batch_size", "8", "--trainer.val_check_interval", "2"]
    cli = CornstarchCLI(MultimodalLitModule, MultimodalDataModule, trainer_class=CornstarchTrainer,
                        args=["--config", str(path), *small], run=False)
    lm = cli.model.model.language_model
    assert type(lm).__name__ == "MixtralForCausalLM" and lm.router_aux_loss_coef == 0.02
    cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    shares = [float(metrics[f"train/expert_share/{e}"]) for e in range(4)]
    assert abs(sum(shares) - 1) < 1e-5 and float(metrics["train/expert_load_max"]) >= 1
    assert float(metrics["train/router_aux_loss"]) > 1 and float(metrics["val/router_aux_loss"]) > 1
    # one validation batch: val/loss includes the router term, val/epoch_loss (and the perplexity) does not
    torch.testing.assert_close(metrics["val/loss"] - metrics["val/epoch_loss"], 0.02 * metrics["val/router_aux_loss"])


def test_compile_flag_compiles_every_layer_for_training():
    from cornstarch.models.encoder_layers import layer_stack
    from cornstarch.models.multimodal_language_model.compiling import is_compiled

    module = make_module(compile=True)
    for part in (module.model.vision_encoder.module, module.model.language_model):
        assert all(is_compiled(layer) for layer in layer_stack(part)[1])
    assert not any(is_compiled(layer) for layer in layer_stack(make_module().model.language_model)[1])
