"""Tiny ``cornstarch fit`` runs derived from ``experiments/digits_vlm.yaml``, as real processes, for the fault tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "experiments" / "digits_vlm.yaml"
STEPS_PER_EPOCH = 6  # 48 training digits / batch 8
LAST_EVERY = 4


def tiny_config(path: Path, root_dir: Path, max_steps: int = 11, **optimizer: float) -> Path:
    """The default experiment, shrunk: 48 training digits in batches of 8 (6 steps per epoch), 16 validation digits,
    ``max_steps`` steps, ``last.ckpt`` every ``LAST_EVERY`` steps, under ``root_dir``; a CSV log of every step."""
    cfg = yaml.safe_load(EXPERIMENT.read_text())
    cfg["data"]["train"]["kwargs"] = {"image_size": 8, "n": 48}
    cfg["data"]["val"]["kwargs"] = {"image_size": 8, "n": 16}
    cfg["data"]["batch_size"] = 8
    cfg["model"]["generation"]["max_new_tokens"] = 2
    cfg["model"]["optimizer"].update(optimizer)
    trainer = cfg["trainer"]
    trainer.update(max_steps=max_steps, max_epochs=None, log_every_n_steps=1, num_sanity_val_steps=0,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root_dir))
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                         "init_args": {"save_dir": str(root_dir), "flush_logs_every_n_steps": 1}}
    trainer["callbacks"] = [c for c in trainer["callbacks"] if c["class_path"].startswith("cornstarch.")]
    trainer["callbacks"][0]["init_args"]["last_every_n_steps"] = LAST_EVERY
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, *args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start ``cornstarch fit --config config *args`` (through :mod:`tests.reliability.launch`)."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = open(log or os.devnull, "w")
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.launch", "fit", "--config", str(config), *args],
                            cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Poll ``predicate`` until true; fail if ``proc`` exits first or after ``timeout`` seconds (a hang guard only)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def steps_done(progress: Path) -> int:
    """The newest global step a run reported in its ``CS_PROGRESS`` file (0 before the first)."""
    lines = progress.read_text().split() if progress.exists() else []
    return int(lines[-1]) if lines else 0


def signal_after(config: Path, progress: Path, signum: int, after_step: int, *args: str,
                 log: Path | None = None) -> int:
    """Run, send ``signum`` once the run has finished ``after_step`` steps, and return its exit status."""
    proc = start(config, *args, env={"CS_PROGRESS": str(progress)}, log=log)
    wait_for(lambda: steps_done(progress) >= after_step, proc, f"step {after_step}")
    os.kill(proc.pid, signum)
    return proc.wait(timeout=300)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoints(directory: Path) -> list[Path]:
    """The files and directories under a checkpoint's name (``*.ckpt``) in ``directory``."""
    return sorted(directory.glob("*.ckpt"))


def same_state(a: dict, b: dict) -> bool:
    """Bit-identical weights and optimizer state, and the same step."""
    if a["global_step"] != b["global_step"] or a["state_dict"].keys() != b["state_dict"].keys():
        return False
    if not all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]):
        return False
    return _equal(a["optimizer_states"], b["optimizer_states"])


def _equal(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(_equal(u, v) for u, v in zip(x, y))
    return x == y


__all__ = ["LAST_EVERY", "STEPS_PER_EPOCH", "checkpoints", "load", "same_state", "signal_after", "signal",
           "start", "steps_done", "tiny_config", "wait_for"]
