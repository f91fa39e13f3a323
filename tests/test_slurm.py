"""The project's SLURM batch script on a real SLURM cluster started on this machine (tests/slurm_cluster.py):
a 2-process DDP quickstart, preemption with requeue and resume, a rank that dies, a study as array jobs
in stages with its analysis after them, and two nodes in network namespaces."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from study.plan import grid_scores
from study.runs import run_states
from study.spec import Study

from .conftest import REPO
from .helpers import scalars
from .netns import netns_available, veth_namespaces
from .slurm_cluster import LocalSlurm, slurm_available
from .test_training import TINY
from .test_transfer import transfer_study

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


@pytest.mark.timeout(900)  # three stages one after another, then the analysis: ~4 min on 2 cores
def test_a_study_is_array_jobs_in_stages_with_its_analysis_after(cluster, tmp_path, shapes_root):
    """python -m study submit: pre-training, then fine-tuning from it and a grid, then the grid's refit, each stage
    array jobs (here of one task each, as a stage larger than the cluster's MaxArraySize is split) waiting for every
    array of the stage before; every run's own overrides and seeds reach it, the refit takes the point its grid
    chose when it starts, and the analysis (CKA on the Trainer under srun, the report) comes last."""
    root = tmp_path / "study"
    root.mkdir()
    spec = yaml.safe_load(transfer_study(root, shapes_root).read_text())
    spec["experiments"][1]["seeds"] = [0]  # p_t: its grid's two points, then one refit
    spec["experiments"][2]["seeds"] = [1]  # ri_t: from random initialisation, its own seed
    spec["cka"] = {"pairs": [["ri_t/seed1", "p_t/seed0"]], "layer": None, "batch_size": 64}
    spec["transfer"] = {}  # the fine-tuning section
    study = root / "study.yaml"
    study.write_text(yaml.safe_dump(spec))
    flags = ["--gpus-per-node=0", "--cpus-per-task=1", "--ntasks-per-node=1"]
    submitted = subprocess.run(
        [sys.executable, "-m", "study", "submit", str(study), f"--sbatch=[{', '.join(flags)}, --output={root}/slurm-%A_%a.out]",
         f"--analysis_sbatch=[{', '.join(flags)}, --output={root}/slurm-analysis-%j.out]", "--max_array_size=1"],
        cwd=REPO, env={**cluster.env, "PYTHON_CMD": sys.executable}, capture_output=True, text=True, timeout=120,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    *arrays, analysis = (int(word) for word in submitted.stdout.replace(",", " ").replace(";", " ").split() if word.isdigit())
    listed = sorted((root / "report" / "slurm").glob("*.runs"))
    assert [p.name.split("-stage")[1] for p in listed] == ["0-0.runs", "0-1.runs", "1-0.runs", "1-1.runs", "2.runs"]
    stages = [path.read_text().split() for path in listed]
    assert stages == [["pretrain/seed0"], ["ri_t/seed1"], ["p_t_grid_lr0_wd0/seed0"], ["p_t_grid_lr1_wd0/seed0"], ["p_t/seed0"]]
    assert len(arrays) == 5
    waits = {arrays[2]: arrays[:2], arrays[3]: arrays[:2], arrays[4]: arrays[2:4], analysis: arrays[4:]}
    for later, earlier in waits.items():  # each waits for every array of the stage before
        dependency = cluster.job(later).get("Dependency", "")  # afterok:<id>_*(unfulfilled),afterok:<id>_*(...)
        assert all(f"afterok:{e}_" in dependency or f"afterok:{e}(" in dependency for e in earlier), dependency
    for array, runs in zip(arrays, stages):
        for task in range(len(runs)):
            finished(cluster, f"{array}_{task}", root)
    finished(cluster, analysis, root)
    config = yaml.safe_load((root / "ri_t" / "softmax" / "seed1" / "config.yaml").read_text())
    assert config["seed_everything"] == 1 and config["model"]["init_from"] is None
    spec = Study.load(study)
    chosen = grid_scores(spec, "p_t", run_states(spec))
    best = next(p for p in chosen.points if p.point == chosen.chosen)
    refit = yaml.safe_load((root / "p_t" / "softmax" / "seed0" / "config.yaml").read_text())
    assert refit["model"]["lr_per_256"] == best.lr_per_256 and refit["data"]["init_args"].get("validation_split") is None
    assert refit["model"]["init_from"].endswith("pre/softmax/seed0/checkpoints/last.ckpt")
    report = root / "report"
    text = (report / "report.md").read_text()
    assert "### Fine-tuning: P-T" in text and "Hyper-parameters of p_t" in text and "ri_t/seed1 vs p_t/seed0" in text
    assert (report / "figure2_cka.png").is_file()
    assert "Traceback" not in output(root)


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
