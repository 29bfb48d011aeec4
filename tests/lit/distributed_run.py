"""One training run of the tiny digits model under a strategy, recording what the distributed tests compare.

Run in-process for the single-process reference (``run(...)``), or as a script for ``ddp``/``fsdp2`` with 2 CPU
processes (Lightning's launcher starts the second process by re-running this script):

    python tests/lit/distributed_run.py '{"strategy": "ddp", "out": "/tmp/x"}'

Each rank writes ``{out}/rank{r}.json``: per step the loss this rank returned, the stage, whether every frozen
parameter's gradient is ``None`` after backward, per-component parameter sums after the step (full parameters,
gathered under FSDP2), and at the end the logits of a fixed batch (``{out}/logits.pt``, rank 0). With
``record_state`` each rank also writes ``{out}/state{r}.pt``: per step, the full model ``state_dict`` and the full
optimizer state (every moment, by parameter name, with each group's learning rate), gathered under FSDP2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cornstarch.data.datamodule import DatasetSpec, MultimodalDataModule  # noqa: E402
from cornstarch.demo import digits_vlm_dataset  # noqa: E402
from cornstarch.data.sampling import EpochShuffleSampler  # noqa: E402
from cornstarch.lit.cli import CornstarchTrainer  # noqa: E402  (atomic checkpoint writes, files and shard dirs)
from cornstarch.lit.module import LoraSpec, MultimodalLitModule  # noqa: E402
from cornstarch.lit.optim import OptimizerConfig  # noqa: E402
from cornstarch.lit.schedule import Stage  # noqa: E402
from cornstarch.models.builder import EncoderSpec, PartSpec, ProcessorSpec  # noqa: E402

TRANSITION = 2  # the tower and the LM start training at this step (epoch 1 with 16 samples and global batch 8)
SCHEDULE = [Stage(train=["vision.projector"], start=0, name="align"),
            Stage(train=["vision.module", "vision.projector", "language_model"], start=TRANSITION, name="finetune")]
LORA_SCHEDULE = [Stage(train=["vision.projector"], start=0, name="align"),
                 Stage(train=["vision.projector", "lora"], start=TRANSITION, name="adapters")]


# A tiny Mixtral as the YAML of an experiment gives it (``model.language_model``): router loss on, its coefficient set.
MIXTRAL = PartSpec("transformers.MixtralForCausalLM",
                   config=dict(vocab_size=600, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                               router_aux_loss_coef=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def make_module(layers: int = 2, gradient_checkpointing: bool = False, lora: bool = False,
                loss_chunk_size: int | None = None, lm: str = "llama") -> MultimodalLitModule:
    """Tiny CLIP-style tower (features from layer -2, CLS dropped: its last layer and post_layernorm are unused) +
    tiny Llama with tied embeddings (or, ``lm="mixtral"``, :data:`MIXTRAL`)."""
    vision = EncoderSpec(
        model=PartSpec("transformers.CLIPVisionModel",
                       config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, image_size=8, patch_size=2)),
        processor=ProcessorSpec("transformers.CLIPImageProcessor",
                                kwargs={"size": {"shortest_edge": 8}, "crop_size": {"height": 8, "width": 8}}),
        token="<image>",
        preprocess_callback="cornstarch.models.feature_selection:request_hidden_states",
        postprocess_module_callback="cornstarch.models.feature_selection:penultimate_layer_without_cls",
    )
    llama = PartSpec("transformers.LlamaForCausalLM",
                     config=dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    return MultimodalLitModule(
        encoders={"vision": vision}, language_model=MIXTRAL if lm == "mixtral" else llama,
        tokenizer="cornstarch.demo:demo_tokenizer",
        projector_type="mlp", gradient_checkpointing=gradient_checkpointing, loss_chunk_size=loss_chunk_size,
        freeze_schedule=LORA_SCHEDULE if lora else SCHEDULE, lora=LoraSpec(r=2) if lora else None,
        optimizer=OptimizerConfig(lr=1e-3, lr_groups={"language_model": 5e-4}, warmup_steps=1, schedule="cosine"))


def make_dataset(n: int, text_only: list[int]):
    """``n`` digits; the rows at ``text_only`` lose their image (a text-only question)."""
    rows = digits_vlm_dataset("train", image_size=8, n=n).to_list()
    for i in text_only:
        rows[i]["images"] = []
        rows[i]["messages"][0]["content"] = rows[i]["messages"][0]["content"].replace("<image>", "").strip()
    from datasets import Dataset

    return Dataset.from_list(rows, features=digits_vlm_dataset("train", image_size=8, n=1).features)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from its shards under FSDP2), detached, on the CPU."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def full_state(pl_module, optimizer) -> dict:
    """The full model ``state_dict`` and optimizer state (by parameter name) after a step."""
    names = {id(p): n for n, p in pl_module.model.named_parameters()}
    optim = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = {k: full(v) if torch.is_tensor(v) else v for k, v in optimizer.state.get(p, {}).items()}
            optim[names[id(p)]] = {**entry, "lr": group["lr"], "group": group["name"]}
    return {"model": {k: full(v) for k, v in pl_module.model.state_dict().items()}, "optimizer": optim}


class Recorder(Callback):
    def __init__(self, record_state: bool = False, own_loss: bool = False):
        self.steps: list[dict] = []
        self.record_state = record_state
        self.states: list[dict] = []
        self.own_loss = own_loss
        self._before: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """With ``own_loss``: this rank's training-path loss, its router term and supervised tokens, and the LM's own
        full-logits loss on the same batch, before the step (every rank runs the same forwards)."""
        if not self.own_loss:
            return
        model = pl_module.model
        inputs, _ = pl_module._split(batch)
        with torch.no_grad():
            torch.manual_seed(0)
            ours = model(**inputs)
            model.supervised_logits_only = False
            torch.manual_seed(0)
            own = model(**inputs)
            model.supervised_logits_only = True
        router = model.router_loss(ours)
        self._before = {"ours": float(ours.loss), "own": float(own.loss), "router": float(router),
                        "tokens": int((inputs["labels"][:, 1:] != -100).sum())}

    def on_after_backward(self, trainer, pl_module):
        frozen = [p for p in pl_module.model.parameters() if not p.requires_grad]
        self.steps.append({**self._before, "step": trainer.global_step, "stage": pl_module.stage_index,
                           "frozen_grads_none": all(p.grad is None for p in frozen), "n_frozen": len(frozen)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sums = {}
        for name, params in pl_module.model.components().items():
            full = [p.full_tensor() if hasattr(p, "full_tensor") else p for _, p in params]
            sums[name] = sum(float(t.detach().double().sum()) for t in full)
        optimizer = trainer.optimizers[0]
        moments = {}
        for group in optimizer.param_groups:
            states = [optimizer.state.get(p, {}) for p in group["params"]]
            full = [s["exp_avg_sq"].full_tensor() if hasattr(s["exp_avg_sq"], "full_tensor") else s["exp_avg_sq"]
                    for s in states if "exp_avg_sq" in s]
            moments[group["name"]] = [group["lr"], sum(float(t.double().sum()) for t in full),
                                      sum(float(s["step"]) for s in states if "step" in s)]
        self.steps[-1].update(loss=float(outputs["loss"].detach()), sums=sums, moments=moments,
                              has_image="pixel_values" in batch, data=int(batch["input_ids"].sum()),
                              epoch=trainer.current_epoch)
        if self.record_state:
            self.states.append({"step": self.steps[-1]["step"], **full_state(pl_module, optimizer)})


def rank1_rows(step: int, per_rank_batch: int, n: int, ranks: int = 2) -> list[int]:
    """Dataset rows that rank 1 of ``ranks`` trains on at ``step`` of epoch 0 (the datamodule's seed-0 order);
    a single process with batch ``ranks * per_rank_batch`` has them in its batch at the same step."""
    order = EpochShuffleSampler(n, seed=0).order()
    start = step * ranks * per_rank_batch
    return [int(order[start + 1 + ranks * j]) for j in range(per_rank_batch)]


def run(config: dict) -> dict:
    """Train as ``config`` says and return (and write, per rank) the records.

    Config keys: ``out``, ``batch_size`` (per rank), ``steps``; optional ``strategy``, ``devices``, ``n_train``,
    ``text_only_step`` (rank 1 of 2 with per-rank batch ``text_only_batch`` has no image at this step),
    ``checkpoint_every``, ``resume``, ``limit_val_batches``, ``gradient_checkpointing``, ``lora``,
    ``loss_chunk_size``, ``record_state``, ``lm`` (``"mixtral"``: the MoE LM, and each step records the LM's own
    loss too), ``data`` (more ``MultimodalDataModule`` arguments, e.g. packing), ``train_shards`` (train on the
    shards in this folder instead).
    """
    L.seed_everything(0, verbose=False)
    strategy = config.get("strategy", "auto")
    devices = config.get("devices", 1)
    module = make_module(gradient_checkpointing=config.get("gradient_checkpointing", False),
                         lora=config.get("lora", False), loss_chunk_size=config.get("loss_chunk_size"),
                         lm=config.get("lm", "llama"))
    n_train = config.get("n_train", 16)
    text_only = ([] if config.get("text_only_step") is None else
                 rank1_rows(config["text_only_step"], config["text_only_batch"], n_train))
    train = (DatasetSpec("shards", data_dir=config["train_shards"]) if config.get("train_shards") else
             make_dataset(n_train, text_only))
    data = MultimodalDataModule(train=train,
                                val=digits_vlm_dataset("validation", image_size=8, n=8),
                                batch_size=config["batch_size"], eval_batch_size=4, **config.get("data", {}))
    recorder = Recorder(record_state=config.get("record_state", False), own_loss=config.get("lm") == "mixtral")
    callbacks = [recorder]
    out = Path(config["out"])
    if config.get("checkpoint_every"):  # saved after the step's batch (at an epoch's last batch: exact resume)
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", filename="{step}",
                                         every_n_train_steps=config["checkpoint_every"], save_top_k=-1))
    trainer = CornstarchTrainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=config["steps"],
                                logger=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, limit_val_batches=config.get("limit_val_batches", 0),
                                gradient_clip_val=1.0, default_root_dir=str(out), callbacks=callbacks,
                                enable_checkpointing=bool(config.get("checkpoint_every")))
    trainer.fit(module, datamodule=data, ckpt_path=config.get("resume"), weights_only=False)
    result = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": recorder.steps,
              "strategy": type(trainer.strategy).__name__}
    # logits of a fixed batch (the same on every rank), from the trained (possibly sharded) model
    inputs = _fixed_batch(data)
    module.eval()
    with torch.no_grad():
        logits = module.model(**inputs).logits
    out.mkdir(parents=True, exist_ok=True)
    if trainer.global_rank == 0:
        torch.save({"logits": logits, "inputs": inputs}, out / "logits.pt")
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if recorder.record_state:
        torch.save(recorder.states, out / f"state{trainer.global_rank}.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # avoids gloo's abort at exit
    return result


def _fixed_batch(data: MultimodalDataModule) -> dict:
    collate = data.collator("val")
    rows = digits_vlm_dataset("validation", image_size=8, n=2)
    batch = collate([{**rows[i], "__index__": i} for i in range(len(rows))])
    return MultimodalLitModule._split(batch)[0]


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    run(json.loads(sys.argv[1]))
