"""The project's SLURM batch script on a real SLURM cluster started on this machine (tests/slurm_cluster.py):
a 2-process DDP quickstart, preemption with requeue and resume, a rank that dies, a study as an array
job with its analysis after it, and two nodes in network namespaces."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO
from .helpers import scalars
from .netns import netns_available, veth_namespaces
from .slurm_cluster import LocalSlurm, slurm_available
from .test_training import TINY

pytestmark = pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available()))
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture
def cluster(tmp_path):
    with LocalSlurm(tmp_path / "cluster") as running:
        yield running


def submit(cluster: LocalSlurm, run_dir: Path, shapes_root: Path, *flags: str, epochs: int = 1, python: str = sys.executable) -> int:
    """The quickstart through slurm/train.sbatch, on CPUs, writing everything under ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)  # for the job's output file, as slurm/logs/ is for the script's
    return cluster.sbatch(
        "--gpus-per-node=0", "--cpus-per-task=1", f"--output={run_dir}/slurm-%j.out", *flags,
        "slurm/train.sbatch", "configs/quickstart.yaml",
        f"--data.init_args.root={shapes_root}", f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}", f"--trainer.max_epochs={epochs}", *TINY,
        cwd=REPO, env={"PYTHON_CMD": python},
    )


def finished(cluster: LocalSlurm, job: int, run_dir: Path, timeout: float = 420) -> dict:
    info = cluster.wait_for(job, FINISHED, timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output(run_dir) + cluster.logs()
    return info


def output(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("slurm-*.out")))


def wait_for_file(path: Path, cluster: LocalSlurm, job: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert cluster.job(job).get("JobState") not in FINISHED, f"job ended before {path} appeared\n{output(path.parents[3])}"
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


def training_processes(run_dir: Path) -> list[int]:
    """The Python processes (not srun) training into ``run_dir``."""
    found = subprocess.run(["pgrep", "-f", f"^{sys.executable} cli.py fit.*{run_dir}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_quickstart_as_a_two_process_ddp_job(cluster, tmp_path, shapes_root):
    run_dir = tmp_path / "run"
    job = submit(cluster, run_dir, shapes_root, "--ntasks-per-node=2")
    info = finished(cluster, job, run_dir)
    assert info["NumTasks"] == "2"
    log = output(run_dir)
    assert "1 node(s) x 2 process(es)" in log and "Traceback" not in log
    version = run_dir / "softmax" / "seed0"
    assert {p.name for p in (version / "checkpoints").iterdir()} == {"last.ckpt", "finished.json"}
    logged = scalars(version)
    # 1024 images at a global batch of 64 over 2 processes: 16 steps, logged every 10
    assert [step for step, _ in logged["train/loss"]] == [9] and [step for step, _ in logged["val/acc1"]] == [15]
    assert (version / "measurements.json").exists()


# Python requeues the job itself; or, where it cannot reach scontrol (as in a container), it exits with 75
# and the batch script requeues. The warning is SIGUSR1 to the tasks (--signal=SIGUSR1@90), or SIGTERM to
# the batch shell, which must outlive it, and to the tasks (preemption by requeue with a GraceTime).
@pytest.mark.parametrize("where, warning", [("python", [["--signal=USR1"]]),
                                            ("batch script", [["--batch", "--signal=TERM"], ["--signal=TERM"]])])
def test_preemption_checkpoints_requeues_and_resumes_into_one_tensorboard_run(cluster, tmp_path, shapes_root, where, warning):
    run_dir = tmp_path / "run"
    python = sys.executable if where == "python" else f"env PATH={Path(sys.executable).parent} {sys.executable}"
    job = submit(cluster, run_dir, shapes_root, "--ntasks-per-node=2", epochs=4, python=python)
    version = run_dir / "softmax" / "seed0"
    wait_for_file(version / "checkpoints" / "last.ckpt", cluster, job)
    for flags in warning:
        cluster.scancel(*flags, str(job))

    info = finished(cluster, job, run_dir, timeout=600)
    log = output(run_dir)
    assert info["Restarts"] == "1", log
    preempted_at = int(log.split("Preempted at step ")[1].split(":")[0])
    assert 16 <= preempted_at < 64 and preempted_at % 10 == 0  # acted on at a check, every 10 steps
    assert "(restart 1)" in log and "Restoring states from the checkpoint path" in log
    assert ("requeueing job" in log) == (where == "batch script")
    # One run: the requeued job appended to the same version, and every step appears once.
    assert len(list(version.glob("events.out.tfevents.*"))) == 2
    logged = scalars(version)
    assert [step for step, _ in logged["train/loss"]] == list(range(9, 64, 10))
    assert [step for step, _ in logged["val/acc1"]] == [15, 31, 47, 63]
    assert [step for step, _ in logged["lr"]] == list(range(9, 64, 10))


def test_a_rank_that_dies_fails_the_job_within_a_bounded_time(cluster, tmp_path, shapes_root):
    run_dir = tmp_path / "run"
    job = submit(cluster, run_dir, shapes_root, "--ntasks-per-node=2", epochs=20)
    wait_for_file(run_dir / "softmax" / "seed0" / "checkpoints" / "last.ckpt", cluster, job)
    ranks = training_processes(run_dir)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.time()
    info = cluster.wait_for(job, FINISHED, timeout=120)
    assert info["JobState"] == "FAILED", info
    assert time.time() - killed < 60
    assert "training failed (srun exit status" in output(run_dir)
    time.sleep(1)
    assert training_processes(run_dir) == []  # the other rank did not stay behind, blocked in a collective


def test_a_study_is_one_array_job_of_config_x_seed_tasks_with_its_analysis_after(cluster, tmp_path, shapes_root):
    """python -m study submit: slurm/sweep.sh --seeds runs each config once per seed into its own run, the
    overrides reach all, and the analysis job (CKA on the Trainer under srun, then the report) starts after."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    configs = []
    for objective in ["Softmax", "Sigmoid"]:
        config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
        config["model"]["objective"] = objective
        configs.append(tmp_path / f"{objective.lower()}.yaml")
        configs[-1].write_text(yaml.safe_dump(config))
    measured = "--trainer.callbacks=[{class_path: callbacks.RepresentationMeasurements, init_args: {layers: penultimate}}]"
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "experiments": [str(c) for c in configs], "seeds": [0, 1], "report": str(tmp_path / "report"),
        "overrides": [f"--data.init_args.root={shapes_root}", f"--trainer.default_root_dir={run_dir}", "--trainer.max_epochs=1",
                      *TINY, measured],
        "cka": {"pairs": [["softmax/seed0", "softmax/seed1"]], "batch_size": 64}, "agreement": True}))
    flags = ["--gpus-per-node=0", "--cpus-per-task=1", "--ntasks-per-node=1"]
    submitted = subprocess.run(
        [sys.executable, "-m", "study", "submit", str(study), f"--sbatch=[{', '.join(flags)}, --output={run_dir}/slurm-%A_%a.out]",
         f"--analysis_sbatch=[{', '.join(flags)}, --output={run_dir}/slurm-analysis-%j.out]"],
        cwd=REPO, env={**cluster.env, "PYTHON_CMD": sys.executable}, capture_output=True, text=True, timeout=120,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    array, analysis = (int(word) for word in submitted.stdout.replace(";", " ").split() if word.isdigit())
    for task in range(4):
        finished(cluster, f"{array}_{task}", run_dir)
    finished(cluster, analysis, run_dir)
    for objective in ["softmax", "sigmoid"]:
        for seed in [0, 1]:
            version = run_dir / objective / f"seed{seed}"  # each objective and seed names its own run
            config = yaml.safe_load((version / "config.yaml").read_text())
            assert config["model"]["objective"]["class_path"] == f"lightning_modules.{objective.capitalize()}"
            assert config["seed_everything"] == seed
            assert [step for step, _ in scalars(version)["val/acc1"]] == [15]  # 1024 images, batch 64: 16 steps
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| Softmax | 2 |" in report and "| Sigmoid | 2 |" in report and "Missing" not in report
    assert (tmp_path / "report" / "figure2_cka.png").is_file()
    assert "Traceback" not in output(run_dir)
@pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))
def test_two_nodes_in_network_namespaces_train_one_ddp_job(tmp_path, shapes_root):
    run_dir = tmp_path / "run"
    with veth_namespaces(["n1", "n2"]) as net:
        with LocalSlurm(tmp_path / "cluster", nodes=net.slurm_nodes(), controller=net.gateway) as cluster:
            job = submit(cluster, run_dir, shapes_root, "--nodes=2", "--ntasks-per-node=1")
            info = finished(cluster, job, run_dir)
    assert info["NodeList"] == "n[1-2]" and info["NumTasks"] == "2"
    log = output(run_dir)
    assert "2 node(s) x 1 process(es)" in log
    logged = scalars(run_dir / "softmax" / "seed0")
    assert [step for step, _ in logged["val/acc1"]] == [15]  # 16 steps: each node took half of every batch
