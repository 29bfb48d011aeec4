"""Cluster runs simulated on localhost with the ``cornstarch`` command (CPU, gloo): two "nodes" launched by
``torchrun --nnodes 2`` and by SLURM's variables as ``srun`` sets them, pre-emption and requeue, and the failure
modes (an unreachable rendezvous, a hung node, a sharded checkpoint resumed on another world size).

Every run trains ``tests/lit/cluster_tiny.yaml`` (32 digits, per-rank batch 4, 12 steps) and records each rank's
per-step losses with :class:`tests.lit.step_log.StepLog`. Every launch is bounded by a timeout, so a hang fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.lit import step_log

REPO = Path(__file__).resolve().parents[2]
CONFIG = "tests/lit/cluster_tiny.yaml"
STEPS = 12
TIMEOUT = 240
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1", **extra}


def fit_args(out: Path, *extra: str, nodes: int = 2) -> list[str]:
    """``cornstarch fit`` of the tiny config on ``nodes`` nodes of one process each, recording into ``out``; the
    run's files (config.yaml, checkpoints) go to ``out/run`` unless ``extra`` names another default_root_dir."""
    return ["fit", "--config", CONFIG, "--trainer.num_nodes", str(nodes), "--trainer.default_root_dir",
            str(out / "run"), "--trainer.callbacks+=tests.lit.step_log.StepLog", "--trainer.callbacks.out", str(out),
            *extra]


def cornstarch(*args: str) -> list[str]:
    return [sys.executable, "-m", "cornstarch.lit.cli", *args]


def launch(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``command`` in the repository with its output in a temporary file (a pipe nobody reads could fill up
    and stall the process, and with it its peers)."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    """Wait for every process (stopping all of them past ``timeout``); ``(returncode, output)`` of each."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: each process prints where it is
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        pytest.fail(f"a launch did not finish within {timeout} s:\n" +
                    "\n-----\n".join(output(p)[-5000:] for p in procs))
    return [(p.returncode, output(p)) for p in procs]


def torchrun(out: Path, strategy: str) -> list[tuple[int, str]]:
    """Two torchrun agents ("nodes", one process each) joining one c10d rendezvous."""
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cluster-test",
               "-m", "cornstarch.lit.cli", *fit_args(out, "--trainer.strategy", strategy)]
    procs = [launch(command, clean_env()) for _ in range(2)]
    return finish(procs)


def slurm_env(rank: int, port: int, bin_dir: Path, ntasks: int = 2, restarts: int = 0) -> dict[str, str]:
    """What ``srun`` sets for task ``rank`` of a job with one task on each of ``ntasks`` nodes (the nodes are this
    machine) after ``restarts`` requeues; ``bin_dir`` (with a stub ``scontrol``) comes first on ``PATH``."""
    return clean_env(SLURM_RESTART_COUNT=str(restarts),
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="cornstarch-test", SLURM_NTASKS=str(ntasks), SLURM_NNODES=str(ntasks),
        SLURM_NTASKS_PER_NODE="1", SLURM_PROCID=str(rank), SLURM_LOCALID="0", SLURM_NODEID=str(rank),
        SLURM_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def stub_scontrol(bin_dir: Path) -> Path:
    """An ``scontrol`` that records its arguments (one call per line) in ``bin_dir/scontrol.calls``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = bin_dir / "scontrol.calls"
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    script.chmod(0o755)
    return calls


def srun(args: list[str], port: int, bin_dir: Path, ranks=(0, 1), restarts: int = 0) -> list[subprocess.Popen]:
    return [launch(cornstarch(*args), slurm_env(r, port, bin_dir, restarts=restarts)) for r in ranks]


def wait_for_step(out: Path, step: int, procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> None:
    """Until rank 0 has recorded ``step`` (fails if a process ended first)."""
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in step_log.read(out, 0)):
        assert all(p.poll() is None for p in procs), finish(procs)
        assert time.monotonic() < deadline, f"step {step} not reached within {timeout} s"
        time.sleep(0.05)


def global_losses(out: Path) -> dict[int, float]:
    """Per step, the mean of the two ranks' returned losses (each rank returns its share of the global
    token-mean loss, so this is the loss of the global batch)."""
    ranks = [step_log.read(out, r) for r in (0, 1)]
    assert [s["step"] for s in ranks[0]] == [s["step"] for s in ranks[1]]
    return {a["step"]: (a["loss"] + b["loss"]) / 2 for a, b in zip(*ranks)}


def assert_ok(results: list[tuple[int, str]]) -> None:
    for code, output in results:
        assert code == 0, output[-6000:]


# ------------------------------------------------------------------------------------------------ torchrun
@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[int, float]:
    """One process with the global batch (8): the reference losses."""
    out = tmp_path_factory.mktemp("single")
    proc = subprocess.run(cornstarch(*fit_args(out, "--data.batch_size", "8", nodes=1)), env=clean_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {r["step"]: r["loss"] for r in step_log.read(out, 0)}


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """The torchrun two-node runs, launched once per strategy and shared (the SLURM test's uninterrupted runs)."""
    runs: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in runs:
            out = tmp_path_factory.mktemp(f"torchrun_{strategy}")
            assert_ok(torchrun(out, strategy))
            runs[strategy] = out
        return runs[strategy]

    return get


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_two_nodes_match_one_process(single, torchrun_runs, strategy):
    """``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d ... -m cornstarch.lit.cli fit ...
    --trainer.num_nodes 2``: Lightning runs in torchrun's environment with world size 2, and the global loss of
    every step is within 1e-5 of one process with the same global batch."""
    out = torchrun_runs(strategy)
    first = step_log.read(out, 1)[0]
    assert (first["environment"], first["world_size"]) == ("TorchElasticEnvironment", 2)
    assert first["strategy"] == {"ddp": "DDPStrategy", "fsdp2": "FSDP2Strategy"}[strategy]
    losses = global_losses(out)
    assert sorted(losses) == sorted(single) == list(range(STEPS))
    for step, loss in losses.items():
        assert abs(loss - single[step]) < 1e-5, (step, loss, single[step])


# ------------------------------------------------------------------------------------------------ SLURM
SLURM_STRATEGY = "fsdp2"


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """Two tasks launched as ``srun`` would (SLURM_* set, one task per "node"), fsdp2, 0.3 s per step; SIGUSR1 sent
    to both once rank 0 has recorded step 2; then the same command launched again, as the requeued job runs it
    (SLURM_RESTART_COUNT=1)."""
    root = tmp_path_factory.mktemp("slurm")
    bin_dir, out = root / "bin", root / "steps"
    calls = stub_scontrol(bin_dir)
    args = fit_args(out, "--trainer.strategy", SLURM_STRATEGY, "--trainer.default_root_dir", str(root / "run"),
                    "--trainer.callbacks.delay", "0.3")
    procs = srun(args, free_port(), bin_dir)
    wait_for_step(out, 2, procs)
    for proc in procs:
        proc.send_signal(signal.SIGUSR1)
    first = finish(procs)
    stopped = [r["step"] for r in step_log.read(out, 0)]
    saved = sorted(p.name for p in (root / "run").glob("hpc_ckpt_*"))
    requeue_calls = calls.read_text().splitlines() if calls.exists() else []
    second = finish(srun(args, free_port(), bin_dir, restarts=1))
    return {"first": first, "second": second, "stopped": stopped, "saved": saved, "calls": requeue_calls,
            "out": out, "root": root}


def test_slurm_preemption_saves_requeues_and_resumes_exactly(preempted, torchrun_runs):
    """Under SLURM's variables Lightning picks SLURMEnvironment; SIGUSR1 mid-run makes both ranks stop at the same
    step boundary, save ``hpc_ckpt_1.ckpt`` and exit with 128 + SIGUSR1 after rank 0 ran ``scontrol requeue 4242``
    (once). The same command launched again resumes from that checkpoint by itself and continues with the losses
    of the uninterrupted run (the torchrun run of the same config), bit for bit, to the last step."""
    for code, output in preempted["first"]:
        assert code == 128 + signal.SIGUSR1, output[-6000:]
        assert "Received SIGUSR1" in output
    assert preempted["calls"] == ["requeue 4242"]
    assert preempted["saved"] == ["hpc_ckpt_1.ckpt"]
    stopped = preempted["stopped"]
    assert 2 <= stopped[-1] < STEPS - 1, stopped  # stopped mid-run
    assert_ok(preempted["second"])
    resumed_from = f"resuming from {preempted['root'] / 'run' / 'hpc_ckpt_1.ckpt'}"
    assert all(resumed_from in output for _, output in preempted["second"])
    records = [step_log.read(preempted["out"], r) for r in (0, 1)]
    assert records[1][0]["environment"] == "SLURMEnvironment"
    for r in (0, 1):  # each rank: the steps before the stop, then the resumed ones, none twice
        assert [s["step"] for s in records[r]] == list(range(STEPS)), r
    reference = torchrun_runs(SLURM_STRATEGY)
    for r in (0, 1):
        want = step_log.read(reference, r)
        for got, ref in zip(records[r], want):
            assert (got["loss"], got["data"]) == (ref["loss"], ref["data"]), (r, got, ref)


# ------------------------------------------------------------------------------------------------ failures
COLLECTIVE_TIMEOUT = 10  # seconds: --trainer.collective_timeout of the failure tests
BOUND = 120  # a launch still running after this has hung (Lightning's default collective timeout is 30 min)


def test_rank_that_cannot_reach_the_rendezvous_fails_within_the_timeout(tmp_path):
    """Rank 1 of 2 under SLURM's variables, with MASTER_ADDR:MASTER_PORT where nothing listens (rank 0 never
    started): it gives up after the collective timeout and names the rendezvous. torchrun's own rendezvous: one
    agent of ``--nnodes 2`` whose peer never comes fails after ``--rdzv-conf join_timeout``."""
    args = fit_args(tmp_path / "steps", "--trainer.strategy", "ddp",
                    "--trainer.collective_timeout", str(COLLECTIVE_TIMEOUT))
    [(code, out)] = finish(srun(args, free_port(), tmp_path / "bin", ranks=(1,)), timeout=BOUND)
    assert code != 0
    assert f"Rank 1 could not join the process group within {COLLECTIVE_TIMEOUT} s" in out, out[-4000:]
    assert not step_log.read(tmp_path / "steps", 1)  # never trained

    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
               "--rdzv-conf", f"join_timeout={COLLECTIVE_TIMEOUT}", "-m", "cornstarch.lit.cli", *args]
    [(code, out)] = finish([launch(command, clean_env())], timeout=BOUND)
    assert code != 0 and "RendezvousTimeoutError" in out, out[-4000:]


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_survivor_of_a_dead_or_hung_node_exits_with_a_clear_error(tmp_path, fault):
    """Two SLURM tasks training with ``--trainer.collective_timeout 10``; at step 2 rank 1's process is stopped
    (SIGSTOP: a hung node, its connections stay open) or killed (SIGKILL: its connections close). Rank 0 exits
    with an error naming the failed collective instead of waiting (for the hung node, after the timeout)."""
    out = tmp_path / "steps"
    args = fit_args(out, "--trainer.strategy", "ddp", "--trainer.collective_timeout", str(COLLECTIVE_TIMEOUT),
                    "--trainer.callbacks.delay", "0.3")
    survivor, victim = srun(args, free_port(), tmp_path / "bin")
    try:
        wait_for_step(out, 2, [survivor, victim])
        victim.send_signal(getattr(signal, fault))
        [(code, output)] = finish([survivor], timeout=BOUND)
    finally:
        victim.kill()
        victim.wait()
    assert code != 0
    assert "Rank 0: a collective failed: another rank died or stopped responding" in output, output[-4000:]
    assert f"the collective timeout is {COLLECTIVE_TIMEOUT} s" in output
    assert step_log.read(out, 0)[-1]["step"] < STEPS - 1  # it did not train on alone


def test_sharded_checkpoint_resumes_on_another_world_size_and_is_refused_where_unreadable(preempted, single,
                                                                                           tmp_path):
    """The SLURM run's ``hpc_ckpt_1.ckpt`` holds the shards of 2 ranks. ``fsdp2`` on 1 process with the same global
    batch (8) resumes it: the shards are redistributed and the data position holds, so every later loss is within
    1e-5 of one process trained from the start. One process without fsdp2 reads single files: it is refused
    with a message naming the 2 ranks and what to do, before anything is loaded."""
    ckpt = str(preempted["root"] / "run" / "hpc_ckpt_1.ckpt")
    stop = preempted["stopped"][-1]
    out = tmp_path / "one"
    proc = finish([launch(cornstarch(*fit_args(out, "--trainer.strategy", "fsdp2", "--data.batch_size", "8",
                                               "--ckpt_path", ckpt, nodes=1)), clean_env())])
    assert_ok(proc)
    resumed = step_log.read(out, 0)
    assert [r["step"] for r in resumed] == list(range(stop + 1, STEPS))
    for r in resumed:
        assert abs(r["loss"] - single[r["step"]]) < 1e-5, (r, single[r["step"]])

    [(code, output)] = finish([launch(cornstarch(*fit_args(tmp_path / "refused", "--data.batch_size", "8",
                                                           "--ckpt_path", ckpt, nodes=1)), clean_env())])
    assert code != 0
    assert "is a sharded checkpoint (written by fsdp2 on 2 ranks); SingleDeviceStrategy reads single-file" in output
    assert not step_log.read(tmp_path / "refused", 0)


# ------------------------------------------------------------------------------------------------ units
def test_collective_timeout_is_set_on_distributed_strategies():
    from cornstarch.lit.cli import CornstarchTrainer

    for strategy in ("ddp", "fsdp2"):
        trainer = CornstarchTrainer(accelerator="cpu", devices=2, strategy=strategy, collective_timeout=12.5,
                                    logger=False)
        assert trainer.strategy._timeout.total_seconds() == 12.5
    CornstarchTrainer(accelerator="cpu", devices=1, collective_timeout=5, logger=False)  # one device: nothing to set
    with pytest.raises(ValueError, match="collective_timeout must be positive"):
        CornstarchTrainer(accelerator="cpu", devices=1, collective_timeout=0, logger=False)


def test_requeue_job_calls_scontrol_with_the_job_or_array_task(tmp_path, monkeypatch):
    from cornstarch.lit.cluster import requeue_job

    calls = stub_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert requeue_job() == 0
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_job() == 0
    assert calls.read_text().splitlines() == ["requeue 77", "requeue 70_3"]


def test_requeued_job_resumes_from_the_newest_of_hpc_and_last(tmp_path, monkeypatch):
    """A job SLURM restarted, with no --ckpt_path: the newest of hpc_ckpt_<n>.ckpt (requeue signal) and last.ckpt
    (saved on SIGTERM); a first run, or a given path, is left alone. Another requeue signal, or none, through the
    SLURMEnvironment plugin."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cornstarch.lit.cli import CornstarchTrainer
    from cornstarch.lit.cluster import SlurmRequeue, requeued_resume_path

    for key, value in slurm_env(0, 1, tmp_path, ntasks=1).items():
        if key.startswith("SLURM_"):
            monkeypatch.setenv(key, value)
    trainer = CornstarchTrainer(accelerator="cpu", devices=1, logger=False, default_root_dir=str(tmp_path / "root"),
                                callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_last=True)])
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "SLURMEnvironment"
    assert any(isinstance(c, SlurmRequeue) for c in trainer.callbacks)
    hpc, last = tmp_path / "root" / "hpc_ckpt_2.ckpt", tmp_path / "ckpts" / "last.ckpt"
    for i, path in enumerate((tmp_path / "root" / "hpc_ckpt_1.ckpt", hpc, last)):
        path.parent.mkdir(exist_ok=True)
        path.write_text("")
        os.utime(path, (1000 + i, 1000 + i))
    assert requeued_resume_path(trainer, None) is None  # SLURM_RESTART_COUNT=0: a first run
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_resume_path(trainer, None) == str(last)
    os.utime(hpc, (2000, 2000))
    assert requeued_resume_path(trainer, None) == str(hpc)
    assert requeued_resume_path(trainer, "given.ckpt") == "given.ckpt"

    other = CornstarchTrainer(accelerator="cpu", devices=1, logger=False,
                              plugins=[SLURMEnvironment(requeue_signal=signal.SIGUSR2)])
    assert [c.signum for c in other.callbacks if isinstance(c, SlurmRequeue)] == [signal.SIGUSR2]
    off = CornstarchTrainer(accelerator="cpu", devices=1, logger=False, plugins=[SLURMEnvironment(auto_requeue=False)])
    assert not any(isinstance(c, SlurmRequeue) for c in off.callbacks)


def test_requeue_waits_for_the_end_of_a_gradient_accumulation(tmp_path, monkeypatch):
    """One SLURM task accumulating 2 batches per optimizer step; SIGUSR1 arrives during the first batch: the
    checkpoint is saved after the second one (global step 1, its gradients applied), never between them."""
    import lightning as L
    import torch

    from cornstarch.lit.cli import CornstarchTrainer
    from cornstarch.lit.cluster import SlurmRequeue

    for key, value in slurm_env(0, 1, tmp_path, ntasks=1).items():
        if key.startswith("SLURM_") or key == "PATH":
            monkeypatch.setenv(key, value)
    calls = stub_scontrol(tmp_path)

    class Signal(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                os.kill(os.getpid(), signal.SIGUSR1)

    model = torch.nn.Linear(2, 1)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = model

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = CornstarchTrainer(accelerator="cpu", devices=1, max_steps=5, accumulate_grad_batches=2, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, callbacks=[Signal()],
                                default_root_dir=str(tmp_path / "run"))
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(16, 2), batch_size=2))
    requeue = next(c for c in trainer.callbacks if isinstance(c, SlurmRequeue))
    assert requeue.requeued == str(tmp_path / "run" / "hpc_ckpt_1.ckpt")
    saved = torch.load(requeue.requeued, weights_only=False)
    assert saved["global_step"] == 1 and trainer.global_step == 1
    assert calls.read_text().splitlines() == ["requeue 4242"]
