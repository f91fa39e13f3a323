"""``python -m study {run,submit,analyse,report,cka,barrier,criticality,fit_args} --help``: a study from its YAML file
to its report.

    python -m study run configs/studies/embedded.yaml        # every run, one after another, then the analysis
    python -m study submit configs/studies/imagenet.yaml --sbatch "[--partition=gpu]"   # SLURM arrays + analysis job
    python -m study analyse configs/studies/embedded.yaml    # CKA and agreement (Trainer), then the report
    python -m study report configs/studies/embedded.yaml     # the report alone, from what the runs measured
    python -m study cka --pairs "[[runs/a/seed0, runs/b/seed0]]" --out cka/   # CKA of any checkpoints
    python -m study barrier runs/transfer/p_t/softmax/seed0 runs/transfer/p_t/softmax/seed1 --out barrier/
    python -m study criticality runs/transfer/p_t/softmax/seed0 --out criticality/   # against its epoch000.ckpt
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from jsonargparse import CLI

from lightning_modules.classifier import PretrainingError

from . import analyse as analysis
from .barriers import barrier as barrier_pass
from .barriers import figure_barriers
from .cka import compare, figure_two
from .criticality import criticality as criticality_pass
from .criticality import figure_criticality
from .launch import prepare_data, run_locally, submit_to_slurm
from .passes import ComparisonError, pass_trainer
from .plan import GridUnfinished, with_chosen_point
from .report import ReportError, write_report
from .runs import Collected, RunState, collect, collect_folder, run_states
from .spec import Study, StudyError, TransferPlan, check_grid, check_lambdas


def run(study: str, analyse_after: bool = True) -> None:
    """Run every unfinished run of ``study`` here, one after another (finished ones are skipped, unfinished
    ones resumed), then its analysis (``analyse``).

    Args:
        study: the study file (configs/studies/*.yaml).
        analyse_after: run the analysis once every run has finished.
    """
    spec = Study.load(study)
    start = time.perf_counter()
    states = run_states(spec)
    timings = {"planning": time.perf_counter() - start}
    timings["data"] = prepare_data(spec, states)
    failed = run_locally(spec, states, timings)
    timings["all runs"] = time.perf_counter() - start - timings["data"] - timings["planning"]
    print(f"\nstudy: data {timings['data']:.0f} s, runs {timings['all runs']:.0f} s", flush=True)
    analysis.write_json(spec.report, "timings.json", timings)
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(s.run.name for s in failed)} (their output is above; the report "
              f"lists them as missing)", file=sys.stderr, flush=True)
    if analyse_after:
        analyse_planned(spec, states)
    if failed:
        sys.exit(1)


def submit(study: str, sbatch: Optional[list[str]] = None, analysis_sbatch: Optional[list[str]] = None,
           max_array_size: int = 1000) -> None:
    """Submit ``study`` to SLURM: its unfinished runs as one array job per stage (a task per run, each as
    slurm/train.sbatch runs one; a stage waits for the runs it starts from: pre-training before fine-tuning, a
    grid before its refit) and its analysis (slurm/analyse.sbatch) to start when every task has succeeded
    (--dependency=afterok).

    Args:
        study: the study file.
        sbatch: sbatch flags for every array, e.g. [--partition=gpu, --nodes=2].
        analysis_sbatch: sbatch flags for the analysis job.
        max_array_size: the most tasks of one array job (the cluster's MaxArraySize - 1); a larger stage is split.
    """
    if max_array_size < 1:
        raise SystemExit(f"max_array_size must be >= 1, got {max_array_size}.")
    spec = Study.load(study)
    arrays, job = submit_to_slurm(spec, run_states(spec), list(sbatch or []), list(analysis_sbatch or []), max_array_size)
    print(f"array jobs {', '.join(arrays) or '(none: every run has finished)'}; analysis job {job}"
          f"{' after them' if arrays else ''}; logs in slurm/logs/")


def fit_args(study: str, run: str) -> None:
    """The ``cli.py fit`` arguments of one run of ``study``, NUL-separated on stdout: what slurm/train.sbatch runs
    for an array task of ``submit``; a refit's include the point its grid chose (an error while the grid has
    unfinished runs).

    Args:
        study: the study file.
        run: the run, <experiment>/seed<k>.
    """
    spec = Study.load(study)
    chosen = spec.find_run(run)
    grid = spec.grids.get(chosen.experiment)  # a refit reads its grid's runs; a task plans those, not the study
    states = run_states(spec, {p.experiment for p in grid.points}) if grid else {}
    sys.stdout.write("\0".join(with_chosen_point(spec, chosen, states).fit_args()))


def analyse(study: str, accelerator: str = "auto", devices: str = "auto", num_nodes: int = 1) -> None:
    """The study's passes over its networks on Lightning's Trainer (N devices, SLURM under srun): CKA and
    prediction agreement (<report>/cka.json), barriers, criticality and the representation tables of ``transfer:``
    (<report>/transfer.json); then the report.

    Args:
        study: the study file.
        accelerator: Trainer accelerator for the comparison pass.
        devices: Trainer devices (processes) for the comparison pass.
        num_nodes: Trainer nodes.
    """
    spec = Study.load(study)
    analyse_planned(spec, run_states(spec), accelerator, devices, num_nodes)


def analyse_planned(spec: Study, states: dict[str, RunState], accelerator: str = "auto", devices: str = "auto",
                    num_nodes: int = 1) -> None:
    """``analyse`` of a study whose runs a command has planned (``run_states``): planned once per command."""
    trainer = pass_trainer(accelerator, devices, num_nodes)
    cka, _ = analysis.analyse(spec, trainer, states)
    if trainer.is_global_zero:  # every process took part in the passes; one writes the report
        write_study_report(str(spec.path), spec, collect(spec, states), cka_file=str(spec.report / "cka.json") if cka else None)


def report(source: str, out: Optional[str] = None, cka_file: Optional[str] = None) -> None:
    """Write a study's report (results.csv, report.md, figures) from its runs' measurements.

    Args:
        source: the study file; or a folder of runs laid out as <experiment>/seed<k> (runs made without one).
        out: the report's folder (default: the study's ``report``, or <folder>/report).
        cka_file: CKA results to draw Figure 2 from (default: <out>/cka.json when present).
    """
    spec = Study.load(source) if not Path(source).is_dir() else None
    collected = collect(spec, run_states(spec)) if spec else collect_folder(Path(source))
    write_study_report(source, spec, collected, out, cka_file)


def write_study_report(source: str, spec: Optional[Study], collected: Collected, out: Optional[str] = None,
                       cka_file: Optional[str] = None) -> None:
    """``report`` of runs already read (``collected``; ``spec``: their study, None for a folder of runs)."""
    folder = Path(out) if out else (spec.report if spec else Path(source) / "report")
    cka_path = Path(cka_file) if cka_file else folder / "cka.json"
    cka = json.loads(cka_path.read_text()) if cka_path.is_file() else None
    transfer_path = folder / "transfer.json"
    transfer = json.loads(transfer_path.read_text()) if spec and spec.transfer and transfer_path.is_file() else None
    start = time.perf_counter()
    path = write_report(collected, folder, title=f"Study {spec.path.stem}" if spec else f"Runs in {source}", cka=cka,
                        transfer=transfer)
    seconds = time.perf_counter() - start
    analysis.record_time(folder, "report", seconds)
    counted = (f"{len(collected.runs)} runs with measurements, {len(collected.unmeasured)} fine-tuning runs, "
               f"{len(collected.missing)} missing" if transfer else
               f"{len(collected.runs)} runs, {len(collected.missing) + len(collected.unmeasured)} missing")
    print(f"report: {path} ({counted}; {seconds:.1f} s)")


def cka(pairs: Optional[list[tuple[str, str]]] = None, out: str = "cka", matrix: Optional[list[str]] = None, layer: str = "penultimate",
        agreement: bool = False, batch_size: int = 250, images: Optional[int] = None, epochs: int = 1, seed: int = 0,
        stem: bool = False, accelerator: str = "auto", devices: str = "auto", num_nodes: int = 1) -> None:
    """Block x block CKA between pairs of checkpoints (Figure 2a), optionally one layer's CKA between every two
    of ``matrix`` (Figure 2b) and their prediction agreement, on the first run's validation images; writes
    <out>/cka.json and <out>/figure2_cka.png.

    Args:
        pairs: pairs of run folders or .ckpt files (``<ref>@untrained``: the same architecture untrained, its
            batch-norm moments computed on training images).
        out: folder for the results.
        matrix: run folders or .ckpt files compared at ``layer``.
        layer: the matrix's layer (a block name or penultimate).
        agreement: prediction agreement between every two of ``matrix``.
        batch_size: images per CKA minibatch (> 3; the paper uses 1,500).
        images: this many validation images, drawn class-balanced (all by default).
        epochs: passes over the images, each in a fresh random order (the paper: 10 over ImageNet val).
        seed: seed of the images drawn, their orders, and the untrained control's initialisation.
        stem: the pairs' layers start with the stem's output (the first block's input).
    """
    pairs = pairs or []
    names = list(dict.fromkeys([*(n for p in pairs for n in p), *(matrix or [])]))
    if not names:
        raise SystemExit("cka: name --pairs and/or --matrix (run folders or .ckpt files).")
    trainer = pass_trainer(accelerator, devices, num_nodes)
    results = compare({n: n for n in names}, [tuple(p) for p in pairs], matrix or [], layer, agreement,
                      batch_size=batch_size, images=images, seed=seed, epochs=epochs, stem=stem, trainer=trainer)
    if trainer.is_global_zero:
        folder = Path(out)
        analysis.write_json(folder, "cka.json", results)
        figure_two(results, folder / "figure2_cka.png")
        print(f"CKA: {folder / 'cka.json'}, {folder / 'figure2_cka.png'}")


def barrier(a: str, b: str, out: str = "barrier", lambdas: Optional[list[float]] = None, images: int = 1000,
            bn_images: int = 2000, batch_size: int = 250, seed: int = 0, resamples: int = 1000, accelerator: str = "auto",
            devices: str = "auto", num_nodes: int = 1) -> None:
    """Loss and error along the straight path between two checkpoints (run folders or .ckpt), with batch-norm
    moments recomputed at every lambda and, for comparison, interpolated; their parameter distance. Writes
    <out>/barrier.json and <out>/barrier.png.

    Args:
        a: theta_0.
        b: theta_1.
        out: folder for the results.
        lambdas: the grid (default: 51 points from 0 to 1); must hold 0 and 1.
        images: training and test images evaluated at every lambda (drawn class-balanced from seed).
        bn_images: training images the moments are recomputed on.
        batch_size: images per batch.
        seed: seed of the images drawn and of the bootstrap.
        resamples: bootstrap resamples of the images (95 % intervals of the barriers).
    """
    lambdas = TransferPlan.lambdas if lambdas is None else lambdas
    check_lambdas(lambdas)
    trainer = pass_trainer(accelerator, devices, num_nodes)
    entry = barrier_pass(a, b, lambdas, images=images, batch_size=batch_size, bn_images=bn_images, seed=seed,
                         resamples=resamples, trainer=trainer)
    if trainer.is_global_zero:
        folder = Path(out)
        analysis.write_json(folder, "barrier.json", entry)
        figure_barriers([entry], folder / "barrier.png")
        r = entry["recomputed"]["test"]
        low, high = r["error_barrier_interval"]
        print(f"test loss barrier {r['loss_barrier']:.4f}, error barrier {r['error_barrier']:.4f} (95 % interval "
              f"{low:.4f} to {high:.4f}; interpolated moments: {entry['interpolated']['test']['loss_barrier']:.4f}); "
              f"{folder / 'barrier.json'}")


def criticality(run: str, initial: Optional[str] = None, out: str = "criticality", alphas: Optional[list[float]] = None,
                sigmas: Optional[list[float]] = None, draws: int = 10, epsilon: float = 0.01, admissible: str = "error",
                modules: str = "layers", seed: int = 0, images: int = 1000, batch_size: int = 250, accelerator: str = "auto",
                devices: str = "auto", num_nodes: int = 1) -> None:
    """Module criticality of a checkpoint against its starting weights; writes <out>/criticality.json and a figure.

    Args:
        run: a run folder or .ckpt (the final weights).
        initial: the starting weights (default: <run>/checkpoints/epoch000.ckpt).
        out: folder for the results.
        alphas: alpha grid in [0, 1].
        sigmas: sigma grid in (0, 1], relative to the RMS of each weight tensor.
        draws: noise draws per point (the reference code: 10).
        epsilon: admissible rise of the mean train error over the final network's (or, with admissible=loss, of
            the mean loss, relative).
        admissible: error (train 0-1 error, the definition) or loss (the TensorFlow implementation's).
        modules: layers (each convolution or linear layer with its batch norm) or blocks.
        seed: seed of the images drawn and of the noise.
        images: training (and, for rewinding, test) images evaluated at every point.
        batch_size: images per batch.
    """
    initial = initial or str(Path(run) / "checkpoints" / "epoch000.ckpt")
    alphas, sigmas = alphas or TransferPlan.alphas, sigmas or TransferPlan.sigmas
    check_grid(alphas, sigmas, draws, admissible)
    trainer = pass_trainer(accelerator, devices, num_nodes)
    found = criticality_pass(run, initial, alphas, sigmas, draws, epsilon, admissible, modules, seed, images=images,
                             batch_size=batch_size, trainer=trainer)
    if trainer.is_global_zero:
        found["run"] = run
        folder = Path(out)
        analysis.write_json(folder, "criticality.json", found)
        figure_criticality([found], folder / "criticality.png")
        print(", ".join(f"{p}: {m['criticality']}" for p, m in found["modules"].items()) + f"; {folder / 'criticality.json'}")


def main() -> None:
    try:
        CLI([run, submit, analyse, report, cka, barrier, criticality, fit_args])
    except (StudyError, ReportError, ComparisonError, PretrainingError, GridUnfinished) as err:  # said plainly, without a traceback
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
