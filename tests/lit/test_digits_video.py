"""experiments/digits_video.yaml: the config parses, and its model trains two steps and validates on a few clips
(each field as written, only sizes shrunk)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import yaml

from cornstarch.lit.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "digits_video.yaml"


def test_video_experiment_parses_trains_and_validates(tmp_path, monkeypatch):
    monkeypatch.setenv("CORNSTARCH_CACHE", str(tmp_path / "cache"))  # clips written afresh, offline
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert info.value.code in (0, None)
    config = yaml.safe_load(out.getvalue())
    assert set(config["model"]["encoders"]) == {"video"}
    assert config["data"]["train"]["path"] == "cornstarch.demo:digits_video_dataset"
    small = ["--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
             "--trainer.num_sanity_val_steps", "0",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--trainer.default_root_dir", str(tmp_path / "run"), "--data.train.kwargs.n", "16",
             "--data.val.kwargs.n", "8", "--data.batch_size", "8", "--data.eval_batch_size", "8"]
    main(["fit", "--config", str(CONFIG), *small])
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    assert any(k.startswith("model.video_encoder.module.") for k in state["state_dict"])
