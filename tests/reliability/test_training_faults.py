"""In-process faults: non-finite losses, a full disk, stale or missing ``last.ckpt``, corrupt checkpoints."""

from __future__ import annotations

import math
import resource

import lightning as L
import pytest
import torch

from cornstarch.lit.checkpointing import Checkpoint, CheckpointError, read_checkpoint
from cornstarch.lit.nonfinite import NonFiniteError, NonFiniteGuard
from cornstarch.lit.cli import CornstarchTrainer, load_model_state, main
from cornstarch.lit.optim import OptimizerConfig

from .fit_process import checkpoints, load, tiny_config


class Toy(L.LightningModule):
    """A linear model whose loss is NaN at the steps in ``nan_at`` (1-based optimizer steps)."""

    def __init__(self, nan_at=(), width=4, val_metric=None):
        super().__init__()
        self.layer = torch.nn.Linear(width, 1)
        self.nan_at, self.val_metric = set(nan_at), val_metric
        self.weights_after = {}

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * math.nan if self.global_step + 1 in self.nan_at else loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.weights_after[self.global_step] = self.layer.weight.detach().clone()

    def validation_step(self, batch, batch_idx):
        self.log("val", float(self.val_metric if self.val_metric is not None else self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def _loader(self):
        data = torch.utils.data.TensorDataset(torch.randn(16, self.layer.in_features))
        return torch.utils.data.DataLoader(data, batch_size=4)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def _trainer(tmp_path, *callbacks, **kwargs):
    kwargs = {"max_steps": 6, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
              "num_sanity_val_steps": 0, "default_root_dir": tmp_path, **kwargs}
    return CornstarchTrainer(callbacks=list(callbacks), **kwargs)


def test_nonfinite_loss_stops_on_its_step_and_nothing_after_it_is_saved(tmp_path):
    trainer = _trainer(tmp_path, Checkpoint(last_every_n_steps=1), NonFiniteGuard(check_every_n_steps=2))
    with pytest.raises(NonFiniteError, match="from step 3"):
        trainer.fit(Toy(nan_at={3}))
    steps = sorted(load(p)["global_step"] for p in checkpoints(tmp_path / "checkpoints"))
    assert steps and max(steps) <= 2  # the NaN step's weights were never written
    for path in checkpoints(tmp_path / "checkpoints"):
        assert all(t.isfinite().all() for t in load(path)["state_dict"].values())


def test_nonfinite_step_is_skipped_by_the_skip_policy(tmp_path):
    model = Toy(nan_at={3})
    trainer = _trainer(tmp_path, NonFiniteGuard("skip"))
    trainer.fit(model)
    assert torch.equal(model.weights_after[2], model.weights_after[3])  # step 3 changed nothing
    assert not torch.equal(model.weights_after[3], model.weights_after[4])  # training went on
    assert all(w.isfinite().all() for w in model.weights_after.values())


def test_skip_policy_stops_after_too_many_skips(tmp_path):
    with pytest.raises(NonFiniteError, match="in a row"):
        _trainer(tmp_path, NonFiniteGuard("skip", max_skips=2)).fit(Toy(nan_at={2, 3, 4, 5}))


def test_default_job_with_a_huge_learning_rate_fails_and_saves_no_nan(tmp_path):
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "run", max_steps=8, lr=1e6, warmup_steps=0,
                      lr_groups={"vision.module": 1e6, "vision.projector": 1e6})
    with pytest.raises(NonFiniteError, match="not finite"):
        main(["fit", "--config", str(cfg)])
    for path in checkpoints(tmp_path / "run" / "checkpoints"):
        assert all(t.isfinite().all() for t in load(path)["state_dict"].values() if t.is_floating_point())


def test_last_ckpt_is_the_newest_state_without_improvement_and_at_the_end(tmp_path):
    """The metric never improves after epoch 0 and max_steps ends mid-epoch: last.ckpt still holds the end."""
    trainer = _trainer(tmp_path, Checkpoint(monitor="val", mode="max"), max_steps=10)
    trainer.fit(Toy(val_metric=1.0))  # 4 steps per epoch: validations at steps 4 and 8, the end at 10
    names = sorted(p.name for p in checkpoints(tmp_path / "checkpoints"))
    assert names == ["epoch=0-step=4.ckpt", "last.ckpt"], names
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 10


def test_full_disk_leaves_no_truncated_checkpoint(tmp_path):
    """A write that fails part-way (a file-size limit stands in for a full disk) raises and leaves nothing under
    a checkpoint's name."""
    trainer = _trainer(tmp_path, Checkpoint(last_every_n_steps=2))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises((OSError, RuntimeError), match="File too large|unexpected pos"):  # torch wraps EFBIG
            trainer.fit(Toy(width=100_000))  # 400 KB of weights
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_fit_removes_temporaries_a_killed_save_left(tmp_path):
    """A kill while a checkpoint whose name is never written again was saved left its temporary: the next fit
    removes it (and a stale ``.old`` directory) and keeps every whole checkpoint."""
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / ".epoch=0-step=3.ckpt.partial").write_bytes(b"half a checkpoint")
    (ckpt_dir / ".last.ckpt.old").mkdir()
    (ckpt_dir / "keep.ckpt").write_bytes(b"a whole file")
    _trainer(tmp_path, Checkpoint(), max_steps=2).fit(Toy())
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert not [n for n in names if n.startswith(".")] and {"keep.ckpt", "last.ckpt"} <= set(names), names


def test_ckpt_path_last_without_a_checkpoint_fails_and_auto_starts_fresh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "run", max_steps=1)
    for command in ("fit", "validate"):
        with pytest.raises(CheckpointError, match=r"no last\.ckpt in .*run/checkpoints"):
            main([command, "--config", str(cfg), "--ckpt_path", "last"])
    main(["fit", "--config", str(cfg), "--ckpt_path", "auto"])
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 1


@pytest.fixture
def toy_checkpoint(tmp_path):
    _trainer(tmp_path, Checkpoint(), max_steps=2).fit(Toy())
    return tmp_path / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint_is_a_clear_error_naming_it(toy_checkpoint, damage):
    data = bytearray(toy_checkpoint.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        start = data.index(b"data.pkl") + 40  # inside the pickled structure
        data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])
    toy_checkpoint.write_bytes(bytes(data))
    for read in (read_checkpoint, load_model_state):
        with pytest.raises(CheckpointError, match=f"{toy_checkpoint.name}.*truncated or corrupt"):
            read(toy_checkpoint)
    trainer = _trainer(toy_checkpoint.parent.parent / "again", max_steps=3)
    with pytest.raises(CheckpointError, match=str(toy_checkpoint)):
        trainer.fit(Toy(), ckpt_path=str(toy_checkpoint))


def test_negative_warmup_is_refused():
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -5"):
        OptimizerConfig(warmup_steps=-5).validate([])
