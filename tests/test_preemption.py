"""Preemption in one process: SIGUSR1 mid-epoch -> last.ckpt between two steps -> resume exactly."""

import signal
import subprocess
import sys

import pytest
import torch

import cli
from callbacks.preemption import NOT_REQUEUED_EXIT_CODE, Preempted, Preemption

from .conftest import REPO
from .helpers import SignalAt, scalars
from .test_training import NO_MEASUREMENTS, assert_same_end, fit


@pytest.fixture(autouse=True)
def default_handlers():
    """A fit ended by an exception (Preempted among them) leaves Preemption's inert handlers installed."""
    yield
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_preempted_mid_epoch_resumes_at_the_same_step_with_the_same_data(tmp_path, shapes_root):
    straight = fit(tmp_path / "straight", shapes_root, NO_MEASUREMENTS, epochs=2)

    # 16 steps per epoch; the signal comes at step 21 and is acted on at the next check (every 10 steps),
    # at step 30: batch 14 of epoch 1.
    preempted = fit(tmp_path / "preempted", shapes_root, NO_MEASUREMENTS, epochs=2, run=False)
    preempted.trainer.callbacks.append(SignalAt(21, signal.SIGUSR1))
    with pytest.raises(Preempted) as stop:
        preempted.trainer.fit(preempted.model, datamodule=preempted.datamodule)
    assert stop.value.code == NOT_REQUEUED_EXIT_CODE  # not on SLURM: nothing requeued it
    assert preempted.trainer.global_step == 30
    last = Preemption.checkpoint_path(preempted.trainer)
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 30 and checkpoint["epoch"] == 1

    resumed = fit(tmp_path / "preempted", shapes_root, NO_MEASUREMENTS, "--ckpt_path=last", epochs=2)
    # Equal weights need the two remaining batches of epoch 1 (not its first two), the optimiser's
    # momentum, the lr schedule and the EMA as they were at step 30.
    assert_same_end(straight, resumed, steps=32, epochs=2)

    # One TensorBoard run holding every logged step once, with the straight run's values.
    log_dir = resumed.trainer.logger.log_dir
    assert log_dir == preempted.trainer.logger.log_dir
    ours, reference = scalars(log_dir), scalars(straight.trainer.logger.log_dir)
    for tag in ["train/loss", "lr", "val/acc1"]:
        steps = [step for step, _ in ours[tag]]
        assert steps == [step for step, _ in reference[tag]], tag
        torch.testing.assert_close(torch.tensor([v for _, v in ours[tag]]), torch.tensor([v for _, v in reference[tag]]), rtol=1e-4, atol=1e-5)


# SIGUSR1 while the job restores and builds loaders; SIGTERM (preemption by requeue) once Lightning's own
# SIGTERM handler, which would stop the run without a checkpoint, is installed.
@pytest.mark.parametrize("signum, when", [(signal.SIGUSR1, "fit_start"), (signal.SIGTERM, "train_start")])
def test_a_signal_before_training_starts_is_acted_on_at_the_first_step(tmp_path, shapes_root, signum, when):
    received_by_the_process = []  # stands in for the default action (ending the process) if Preemption missed it
    signal.signal(signum, lambda *_: received_by_the_process.append(True))
    run = fit(tmp_path, shapes_root, NO_MEASUREMENTS, epochs=1, run=False)
    run.trainer.callbacks.insert(0, SignalAt(when, signum))
    with pytest.raises(Preempted):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert not received_by_the_process and run.trainer.global_step == 0
    assert torch.load(Preemption.checkpoint_path(run.trainer), weights_only=False)["global_step"] == 0
    resumed = fit(tmp_path, shapes_root, NO_MEASUREMENTS, "--ckpt_path=last", epochs=1)
    assert resumed.trainer.global_step == 16


def test_without_a_signal_nothing_is_checkpointed_early(tmp_path, shapes_root):
    run = fit(tmp_path, shapes_root, NO_MEASUREMENTS, epochs=1, run=False)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 16
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="SIGNOPE"):
        Preemption(signals=("SIGUSR1", "SIGNOPE"))
    with pytest.raises(ValueError, match="check_every_n_steps"):
        Preemption(check_every_n_steps=0)


def test_a_preempted_process_keeps_its_exit_status_when_srun_terminates_it_on_the_way_out():
    """The first rank to exit with 75 makes ``srun --kill-on-bad-exit`` SIGTERM the others; one still shutting
    down must exit with 75 too, not die of the signal (143, which the batch script reads as a failure)."""
    exiting = (
        "import atexit, os, signal, sys; sys.path.insert(0, '.'); import cli\n"
        "def preempted(): raise cli.Preempted(75)\n"
        "cli.main = preempted\n"
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))  # srun's, during shutdown\n"
        "cli.script()\n"
    )
    ended = subprocess.run([sys.executable, "-c", exiting], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ended.returncode == NOT_REQUEUED_EXIT_CODE, ended.stderr
