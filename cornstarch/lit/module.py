"""MultimodalLitModule: a MultimodalModel trained with Lightning, configured entirely from YAML."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torchmetrics import MeanMetric

from ..batch import EVAL_KEYS, TEXT_KEYS
from ..models.builder import EncoderSpec, HfSpec, PartSpec, ProcessorSpec, build_model_and_processor
from ..models.multimodal_language_model.supervised_loss import token_accuracy
from .optim import OptimizerConfig, WarmupCosine, components_in
from .schedule import FreezeSchedule, Stage
from .sharding import gathered_root, is_fsdp2, shard_fsdp2
from .step_in_backward import StepInBackward
from .strategies import after_freeze_change, prepare_strategy, sharded_fsdp1, world_size

log = logging.getLogger(__name__)


@dataclass
class LoraSpec:
    """LoRA adapters on the language model (through ``peft``); schedule them as the ``"lora"`` component.

    Args:
        r, alpha, dropout: the adapters' rank, scaling and dropout.
        target_modules: names of the LM's linear layers to adapt.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class GenerationSpec:
    """Greedy generation for validation exact match and ``predict``.

    Args:
        max_new_tokens: tokens generated per answer.
        exact_match: compute ``val/exact_match`` (generated answer == reference, whitespace-stripped).
    """

    max_new_tokens: int = 8
    exact_match: bool = True


# language_model's default when from_hf imports it (not None: jsonargparse reads an optional spec's class_path
# field as a class to instantiate).
NO_PART = PartSpec(class_path="")

# Checkpoints keep the specs as hyperparameters; let torch's weights-only loader (Lightning's default) read them.
torch.serialization.add_safe_globals([EncoderSpec, PartSpec, ProcessorSpec, HfSpec, OptimizerConfig, Stage, LoraSpec,
                                      GenerationSpec])


class MultimodalLitModule(L.LightningModule):
    """Train a :class:`MultimodalModel` built from specs, with a freeze/unfreeze schedule.

    Args:
        encoders: modality key → :class:`EncoderSpec` (encoder, processor, placeholder, callbacks).
        language_model: the LM's :class:`PartSpec` (left out with ``from_hf``).
        tokenizer: the LM tokenizer's directory/hub id, or ``"module:function"`` returning one.
        projector_type, projector_activation: projectors created for the encoders.
        from_hf: instead of ``encoders``, ``language_model`` and ``tokenizer`` (then not given): a pretrained
            Llava, Llava-Next or Qwen2-Audio directory or hub id, or an :class:`HfSpec`; model and processor are
            imported from it (components ``vision.module``/``vision.projector`` or ``audio.…``, ``language_model``).
        optimizer: AdamW settings and per-component learning rates.
        freeze_schedule: stages; each names the components that train (default: all, always).
        lora: LoRA adapters on the LM, or ``None``.
        generation: settings of generation in validation/predict.
        gradient_checkpointing: recompute activations in backward (less memory, more compute); per encoder and
            decoder layer, which are also the FSDP units.
        compile: ``torch.compile`` each encoder and decoder layer for training (``MultimodalModel.compile()``):
            the same loss, fewer memory-bound passes; the first training step compiles (tens of seconds on a CPU),
            so it pays off on runs long enough to amortise that; evaluation and generation stay eager.
        loss_chunk_size: fuse the LM head and the training loss and run them this many supervised tokens at a
            time, never keeping ``[tokens, vocab]`` logits (``MultimodalModel.loss_chunk_size``); None: off.

    Raises:
        ValueError: before any training, for an unknown component in the schedule or LR groups, an unknown
            projector type, a part that cannot be built, or ``from_hf`` given with (or neither it nor) the parts.
    """

    def __init__(
        self,
        encoders: dict[str, EncoderSpec] | None = None,
        language_model: PartSpec = NO_PART,
        tokenizer: str | None = None,
        projector_type: str = "mlp",
        projector_activation: str = "gelu",
        optimizer: OptimizerConfig | None = None,
        freeze_schedule: list[Stage] | None = None,
        lora: LoraSpec | None = None,
        generation: GenerationSpec | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        loss_chunk_size: int | None = None,
        from_hf: HfSpec | str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        parts = {"encoders": encoders, "language_model": getattr(language_model, "class_path", None),
                 "tokenizer": tokenizer}
        if from_hf is not None:
            listed = [name for name, value in parts.items() if value]
            if listed:
                raise ValueError(f"from_hf imports the encoders, language model and tokenizer; do not list {listed}.")
            self.model, self.processor = (HfSpec(from_hf) if isinstance(from_hf, str) else from_hf).build()
        else:
            missing = [name for name, value in parts.items() if not value]
            if missing:
                raise ValueError(f"Give {missing} (or from_hf: a pretrained Llava, Llava-Next or Qwen2-Audio).")
            self.model, self.processor = build_model_and_processor(
                encoders, language_model, tokenizer, projector_type, projector_activation)
        if lora is not None:
            self._add_lora(lora)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if compile:
            self.model.compile()
        self.model.loss_chunk_size = loss_chunk_size  # validated by the model
        names = self.model.component_names()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.optimizer_config.validate(names)
        self.schedule = FreezeSchedule(freeze_schedule, names)
        self.generation = generation or GenerationSpec()
        self.stage_index = 0
        self._step_in_backward: StepInBackward | None = None
        self._apply_stage(0)
        self.metrics = torch.nn.ModuleDict({
            f"{split}_{name}": MeanMetric() for split in ("train", "val", "test") for name in ("loss", "acc")
        })
        self.metrics["val_exact_match"] = MeanMetric()
        self.metrics["test_exact_match"] = MeanMetric()

    def _add_lora(self, spec: LoraSpec) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                            target_modules=list(spec.target_modules), task_type="CAUSAL_LM")
        self.model.language_model = get_peft_model(self.model.language_model, config)

    # ----------------------------------------------------------------------------------------------- schedule
    def _apply_stage(self, index: int) -> None:
        """Train the components of stage ``index`` (the model logs each decision); frozen parts go to eval mode."""
        stage = self.schedule.stages[index]
        log.info("Freeze stage %d (%s): %s train", index, stage.label, sorted(stage.train))
        self.model.set_trainable_components(stage.train)
        self.stage_index = index

    def _extend_optimizer(self) -> None:
        """Add param groups for components that start training in the current stage."""
        if self._trainer is None or not self.trainer.optimizers:
            return
        optimizer = self.trainer.optimizers[0]
        have = components_in(optimizer)
        parts = self.model.components()
        for name in self.schedule.trained_until(self.stage_index):
            if name not in have:
                for group in self.optimizer_config.param_groups(name, parts[name]):
                    optimizer.add_param_group(group)
                if self._step_in_backward is not None:
                    self._step_in_backward.attach()
                log.info("Optimizer: added %s (lr %g)", name, self.optimizer_config.lr_groups.get(name, self.optimizer_config.lr))

    def _epoch(self) -> int:
        """The epoch the next train step belongs to, counted from the global step: after a resume Lightning's epoch
        counters can be one off for the first batches (``current_epoch`` after a checkpoint from
        ``on_train_epoch_end``), the step count is not."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        if not 0 < batches < float("inf"):
            return self.current_epoch
        return self.global_step // math.ceil(batches / trainer.accumulate_grad_batches)

    def _sync_stage(self) -> None:
        index = self.schedule.index_at(self.global_step, self._epoch())
        if index != self.stage_index:
            self._apply_stage(index)
            self._extend_optimizer()
            after_freeze_change(self.trainer)  # e.g. DDP rebuilds its reducer for the parameters that train now

    def restore_stage(self, index: int) -> None:
        """Apply a checkpoint's stage and its optimizer groups (strategies that load optimizer state in place
        call this before loading)."""
        if index != self.stage_index:
            self._apply_stage(index)
        self._extend_optimizer()

    # ----------------------------------------------------------------------------------------------- distributed
    def setup(self, stage: str) -> None:
        """Before the strategy wraps the model: distributed runs encode absent modalities on placeholders (every
        rank runs every encoder, so no rank waits on another's collectives) and DDP tolerates unused parameters."""
        if world_size(self._trainer) > 1:
            self.model.encode_absent = True
            prepare_strategy(self.trainer)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``--trainer.strategy fsdp2``): ``fully_shard`` the model's units
        (:mod:`cornstarch.lit.sharding`), with the Trainer precision's mixed-precision policy."""
        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        if not is_fsdp2(self.model):
            shard_fsdp2(self.model, self.device_mesh["data_parallel"], precision=self.trainer.precision)

    def on_train_start(self) -> None:
        self._sync_stage()

    def on_train_epoch_start(self) -> None:
        self._reset("train")
        self._sync_stage()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._sync_stage()
        self.log("train/stage", float(self.stage_index), on_step=True, on_epoch=False)

    def _check_in_backward(self) -> None:
        """optimizer.in_backward needs each gradient final when it is produced: refuse what needs them all."""
        trainer = self.trainer
        problems = [what for what, bad in (
            (f"gradient_clip_val={trainer.gradient_clip_val}", bool(trainer.gradient_clip_val)),
            (f"accumulate_grad_batches={trainer.accumulate_grad_batches}", trainer.accumulate_grad_batches != 1),
            (f"{trainer.world_size} processes", trainer.world_size != 1),
        ) if bad]
        if problems:
            raise ValueError(f"optimizer.in_backward steps each parameter during backward, which cannot go with "
                             f"{', '.join(problems)}; turn those off or set optimizer.in_backward: false.")

    def on_fit_end(self) -> None:
        if self._step_in_backward is not None:
            self._step_in_backward.detach()
            self._step_in_backward = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cornstarch_stage"] = self.stage_index

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restore_stage(checkpoint.get("cornstarch_stage", 0))  # after configure_optimizers: groups join too

    def configure_optimizers(self) -> dict[str, Any]:
        parts = self.model.components()
        groups = [g for name in self.schedule.trained_until(self.stage_index)
                  for g in self.optimizer_config.param_groups(name, parts[name])]
        optimizer = self.optimizer_config.build(groups)
        cfg = self.optimizer_config
        if cfg.in_backward:
            self._check_in_backward()
            self._step_in_backward = StepInBackward(optimizer).attach()
        scheduler = WarmupCosine(optimizer, cfg.warmup_steps, int(self.trainer.estimated_stepping_batches),
                                 cfg.min_lr_ratio, cfg.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------------- steps
    @staticmethod
    def _split(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model inputs, and the extras (answers, generation prompts)."""
        return ({k: v for k, v in batch.items() if k not in EVAL_KEYS},
                {k: v for k, v in batch.items() if k in EVAL_KEYS})

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def _teacher_forced(self, split: str, inputs: dict[str, Any]) -> torch.Tensor:
        out = self.model(**inputs)
        correct, n = token_accuracy(out, inputs["labels"])
        batch_size = inputs["input_ids"].shape[0]
        router = self.model.router_loss(out)  # a MoE LM's router term, already part of out.loss
        loss, ranks = out.loss, world_size(self._trainer)
        cross_entropy = loss if router is None else loss - router
        self.metrics[f"{split}_loss"].update(cross_entropy.detach(), weight=n)  # perplexity: the LM term only
        self.metrics[f"{split}_acc"].update(correct / n.clamp(min=1), weight=n)
        if split == "train" and ranks > 1:
            loss = self._global_token_mean(cross_entropy, n, ranks) + (0 if router is None else router)
        self.log(f"{split}/loss", loss, prog_bar=True, on_step=split == "train", on_epoch=split != "train",
                 batch_size=batch_size, sync_dist=split != "train" or ranks > 1)
        if router is not None:
            self._log_router(split, out, inputs.get("attention_mask"), batch_size, ranks)
        return loss

    def _log_router(self, split: str, out: Any, attention_mask: torch.Tensor | None, batch_size: int,
                    ranks: int) -> None:
        """A MoE LM's router: its auxiliary loss (unscaled), and in training each expert's share of the routed
        tokens (``{split}/expert_share/{e}``, averaged over MoE layers) and the busiest expert's share times the
        number of experts (``expert_load_max``: 1 when balanced)."""
        sync = split != "train" or ranks > 1
        on_step = split == "train"
        self.log(f"{split}/router_aux_loss", out.aux_loss.detach(), on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size, sync_dist=sync)
        share = self.model.expert_load(out, attention_mask) if split == "train" else None
        if share is None:
            return
        values = {f"{split}/expert_share/{e}": v for e, v in enumerate(share)}
        values[f"{split}/expert_load_max"] = share.max() * share.numel()
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=batch_size, sync_dist=sync)

    def _global_token_mean(self, loss: torch.Tensor, n: torch.Tensor, ranks: int) -> torch.Tensor:
        """This rank's share of the mean loss over every rank's supervised tokens.

        DDP and FSDP average gradients over ranks, so each rank returns ``its token sum × ranks / all tokens``:
        the averaged gradient is the gradient of the global token mean, the one a single process computes on
        the whole global batch (a plain per-rank mean would weight a rank's tokens by its batch's token count).
        The mean of the returned values over ranks is that global loss. A MoE router term is not a token mean:
        each rank's counts once, as when every rank computes the LM's own loss, so the caller adds it after this.
        """
        total = self.trainer.strategy.reduce(n.detach().to(loss.dtype).clone(), reduce_op="sum")
        return loss * (n * ranks / total)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        inputs, _ = self._split(batch)
        return self._teacher_forced("train", inputs)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def _generate(self, inputs: dict[str, Any], extras: dict[str, Any]) -> list[str]:
        modality = {k: v for k, v in inputs.items() if k not in TEXT_KEYS}
        ids, mask = extras.get("prompt_input_ids", inputs["input_ids"]), extras.get("prompt_attention_mask",
                                                                                     inputs["attention_mask"])
        tok = self.processor.tokenizer
        with gathered_root(self.model) as sharded:
            synced = sharded or sharded_fsdp1(self._trainer)  # sharded ranks step together until all are done
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.generation.max_new_tokens,
                                      do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      **({"synced_gpus": True} if synced else {}), **modality)
        return [t.strip() for t in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]

    def _evaluate(self, split: str, batch: dict[str, Any]) -> None:
        inputs, extras = self._split(batch)
        self._teacher_forced(split, inputs)
        if self.generation.exact_match and "answers" in extras:
            predictions = self._generate(inputs, extras)
            hits = [p == a.strip() for p, a in zip(predictions, extras["answers"])]
            self.metrics[f"{split}_exact_match"].update(torch.tensor(hits, dtype=torch.float32, device=self.device))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, split: str) -> None:
        loss = self.metrics[f"{split}_loss"]
        if loss.update_count == 0:
            return
        mean_loss = loss.compute()
        values = {f"{split}/epoch_loss": mean_loss, f"{split}/perplexity": torch.exp(mean_loss),
                  f"{split}/token_accuracy": self.metrics[f"{split}_acc"].compute()}
        exact = self.metrics[f"{split}_exact_match"] if f"{split}_exact_match" in self.metrics else None
        if exact is not None and exact.update_count > 0:
            values[f"{split}/exact_match"] = exact.compute()
        # torchmetrics already reduced these over ranks; syncing identical values keeps Lightning from warning
        self.log_dict(values, prog_bar=split != "train", sync_dist=world_size(self._trainer) > 1)

    def _reset(self, split: str) -> None:
        """Reset a split's metrics at its epoch start (outside validate's inference mode, so state stays usable)."""
        with torch.inference_mode(False):
            for name in ("loss", "acc", "exact_match"):
                if f"{split}_{name}" in self.metrics:
                    self.metrics[f"{split}_{name}"].reset()

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def on_test_epoch_start(self) -> None:
        self._reset("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        inputs, extras = self._split(batch)
        predictions = self._generate(inputs, extras)
        answers = extras.get("answers") or [None] * len(predictions)
        return [{"prediction": p, "answer": a} for p, a in zip(predictions, answers)]
