"""Real ``cornstarch fit`` processes killed and resumed: ``kill -9`` while a checkpoint is written (with ``$TMPDIR``
on another filesystem) and at a random step, SIGTERM and SIGINT at random steps; every resume continues bit-exactly, nothing is lost
beyond the ``last.ckpt`` interval, and no file under a checkpoint's name is ever truncated."""

from __future__ import annotations

import random
import subprocess

import pytest

from .fit_process import (LAST_EVERY, checkpoints, load, same_state, signal, signal_after, start, steps_done,
                          tiny_config, wait_for)

MAX_STEPS = 17  # not a multiple of the 6-step epoch or of LAST_EVERY: the end of fit must save the last steps


@pytest.fixture
def other_filesystem(tmp_path):
    """A tmpfs mount for ``$TMPDIR`` (a different filesystem than the run directory)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root or a mount namespace)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_kill_sigterm_sigint_then_resume_is_exact(tmp_path, other_filesystem):
    rng = random.Random()
    reference_cfg = tiny_config(tmp_path / "reference.yaml", tmp_path / "reference", MAX_STEPS)
    reference = start(reference_cfg, log=tmp_path / "reference.log")  # runs beside the faulty chain
    cfg = tiny_config(tmp_path / "run.yaml", tmp_path / "run", MAX_STEPS)
    ckpt_dir = tmp_path / "run" / "checkpoints"

    # 1. kill -9 in the middle of writing a checkpoint, with $TMPDIR on a tmpfs
    stall_at = rng.randint(2, 8)
    mark = tmp_path / "stalled"
    proc = start(cfg, env={"TMPDIR": str(other_filesystem), "CS_STALL_SAVE_AT": str(stall_at),
                           "CS_STALL_MARK": str(mark)}, log=tmp_path / "1-kill.log")
    wait_for(mark.exists, proc, "a checkpoint write")
    proc.kill()
    proc.wait()
    stalled_step, stalled_path = mark.read_text().split(maxsplit=1)
    assert stalled_path.endswith(".partial"), stalled_path  # the half-written file never had a checkpoint's name
    for path in checkpoints(ckpt_dir):
        load(path)  # every file under a checkpoint's name is whole
    assert [p for p in other_filesystem.rglob("*") if p.is_file()] == []  # nothing staged on the other filesystem
    last = ckpt_dir / "last.ckpt"
    saved = load(last)["global_step"] if last.exists() else 0  # killed during the first write: nothing yet
    assert saved >= int(stalled_step) - LAST_EVERY  # nothing lost beyond the configured interval

    # 1b. resume, then kill -9 at a random step (a crash anywhere, not only inside a write): every checkpoint is
    #     whole and last.ckpt is at most the configured interval behind the step reached
    kill_after = rng.randint(saved + 1, max(saved + 1, 9))  # leaves room for the signals below
    rc = signal_after(cfg, tmp_path / "1b.progress", signal.SIGKILL, kill_after, "--ckpt_path", "auto",
                      log=tmp_path / "1b-kill.log")
    assert rc == -signal.SIGKILL, (tmp_path / "1b-kill.log").read_text()[-3000:]
    for path in checkpoints(ckpt_dir):
        load(path)
    reached = steps_done(tmp_path / "1b.progress")
    saved = load(last)["global_step"] if last.exists() else 0
    assert saved >= reached - LAST_EVERY, (saved, reached)

    # 2. resume as a requeued job does (auto: from last.ckpt if there is one), then SIGTERM (preemption) at a
    #    random step: last.ckpt is that step, exit 128 + 15
    after = rng.randint(min(saved + 1, 12), 12)
    rc = signal_after(cfg, tmp_path / "2.progress", signal.SIGTERM, after, "--ckpt_path", "auto",
                      log=tmp_path / "2-sigterm.log")
    assert rc == 143, (tmp_path / "2-sigterm.log").read_text()[-3000:]
    stopped = steps_done(tmp_path / "2.progress")
    assert load(ckpt_dir / "last.ckpt")["global_step"] == stopped >= after

    # 3. resume, then SIGINT (Ctrl-C): the same, exit 128 + 2
    if stopped < MAX_STEPS - 4:  # a signal needs steps left to land in (not after the run ended)
        rc = signal_after(cfg, tmp_path / "3.progress", signal.SIGINT, stopped + 1, "--ckpt_path", "last",
                          log=tmp_path / "3-sigint.log")
        assert rc == 130, (tmp_path / "3-sigint.log").read_text()[-3000:]
        assert load(ckpt_dir / "last.ckpt")["global_step"] == steps_done(tmp_path / "3.progress")

    # 4. resume to the end: the same weights and optimizer state, bit for bit, as the run that was never stopped
    proc = start(cfg, "--ckpt_path", "last", log=tmp_path / "4-finish.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "4-finish.log").read_text()[-3000:]
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    final, expected = load(ckpt_dir / "last.ckpt"), load(tmp_path / "reference" / "checkpoints" / "last.ckpt")
    assert expected["global_step"] == MAX_STEPS  # the steps after the last periodic save are saved at the end
    assert same_state(final, expected)
    assert not list(ckpt_dir.glob(".*"))  # no temporaries left once a run finishes
