"""A study's passes over its finished networks, on Lightning's Trainer: CKA and prediction agreement (written to
``<report>/cka.json``), and the transfer analysis (``<report>/transfer.json``: every fine-tuning run's record, the
grids' scores, the kept checkpoints' probes, barriers, criticality and the talk's tables). Every process takes part in
the passes; the first writes the results.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import lightning as L

from callbacks.checkpoints import finished

from .barriers import barrier
from .cka import compare, representations
from .criticality import criticality
from .passes import ComparisonError, distance
from .plan import grid_scores
from .runs import RunState, checkpoint_probes, finetuning_record, pretraining_source
from .spec import Study

__all__ = ["analyse", "analyse_transfer", "record_time", "study_cka", "write_json"]


def write_json(folder: Path, name: str, found: dict) -> Path:
    """``found`` as ``<folder>/<name>`` (the folder made when missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(found, indent=1))
    return path


def record_time(folder: Path, part: str, seconds: float) -> None:
    """Adds a part's wall time to <report>/timings.json (the study's benchmark: data, each run, CKA, report)."""
    path = folder / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[part] = seconds
    write_json(folder, "timings.json", timings)


def study_cka(spec: Study, trainer: L.Trainer, states: dict[str, RunState]) -> Optional[dict]:
    """CKA and agreement between the study's finished runs (``cka:`` in its file), written to <report>/cka.json
    by the first process; None when none of the runs it names has finished.

    The matrix holds the experiments' runs of ``cka.seed`` and of the study's next seed (the first after the last),
    so that Figure 2b can have rows of one seed and columns of the other: its diagonal is one objective from two
    initialisations, as in the paper, not a run with itself (``cka.cross_seed``); and prediction agreement covers
    every two of them, within an objective and between objectives. With one seed, the runs of that seed alone."""
    plan = spec.cka
    done = {r.name: (r.seed, s.folder) for r in spec.runs for s in [states[r.name]] if s.state == "finished"}
    folders = {name: folder for name, (_, folder) in done.items()}
    pairs = [p for p in plan.pairs if all(n.split("@")[0] in folders for n in p)]
    seeds = list(spec.seeds)
    column_seed = seeds[(seeds.index(plan.seed) + 1) % len(seeds)] if len(seeds) > 1 else None
    matrix = [n for seed in (plan.seed, column_seed) if seed is not None
              for n, (run_seed, _) in done.items() if run_seed == seed] if plan.layer else []
    names = {n for p in pairs for n in p} | set(matrix)
    if not names:
        return None
    networks = {n: str(folders[n.split("@")[0]]) + ("@untrained" if n.endswith("@untrained") else "") for n in sorted(names)}
    start = time.perf_counter()
    cka = compare(networks, pairs, matrix, plan.layer, agreement=spec.agreement, batch_size=plan.batch_size,
                  images=plan.images, epochs=plan.epochs, trainer=trainer)
    if trainer.is_global_zero:
        if "matrix" in cka:
            cka["matrix"]["seed"] = plan.seed  # Figure 2b's rows
            cka["matrix"]["column_seed"] = column_seed  # its columns; None: one seed, the diagonal a run with itself
        cka["skipped_pairs"] = [list(p) for p in plan.pairs if p not in pairs]
        write_json(spec.report, "cka.json", cka)
        seconds = time.perf_counter() - start
        print(f"CKA and agreement of {len(networks)} networks: {seconds:.0f} s", flush=True)
        record_time(spec.report, "cka", seconds)
    return cka


def analyse_transfer(study: Study, trainer: L.Trainer, states: dict[str, RunState]) -> dict:
    """The study's transfer analysis: every finished run's learning curve, the probes of every checkpoint a run kept
    and probed, barriers (recomputed and interpolated batch-norm moments) and distances of ``transfer.pairs``,
    criticality of ``transfer.criticality``, the talk's tables of ``transfer.representations`` (``representations``);
    runs not finished are listed, and pairs that name one skipped, never silently left out."""
    plan = study.transfer
    folders = {run.name: states[run.name].folder for run in study.runs}
    done = {name: folder for name, folder in folders.items() if finished(folder) is not None}

    sources = frozenset(source for folder in done.values() if (source := pretraining_source(folder)) is not None)
    records = [finetuning_record(r.name, r.experiment, r.seed, folders[r.name], sources) for r in study.runs if r.name in done]
    for record in records:  # how far training moved each run from where it started
        start = done[record.run] / "checkpoints" / "epoch000.ckpt"
        record.distance_from_start = distance(str(done[record.run]), str(start))["all"] if start.is_file() else None
    results = {"runs": [asdict(record) for record in records],
               "missing": sorted(set(folders) - set(done)), "barriers": [], "criticality": [],
               "grids": {name: asdict(grid_scores(study, name, states)) for name in study.grids}}
    results["checkpoint_probes"] = {name: rows for name, folder in done.items() if (rows := checkpoint_probes(folder))}
    common = dict(images=plan.images, batch_size=plan.batch_size, seed=plan.seed, trainer=trainer)
    for a, b in plan.pairs:
        if a in done and b in done:
            entry = barrier(str(done[a]), str(done[b]), plan.lambdas, bn_images=plan.bn_images,
                            resamples=plan.resamples, **common)
            results["barriers"].append({**entry, "a": a, "b": b})
    for name in plan.criticality:
        if name in done:
            start = done[name] / "checkpoints" / "epoch000.ckpt"
            if not start.is_file():
                raise ComparisonError(f"{name}: no checkpoints/epoch000.ckpt (its starting weights) to measure criticality "
                                      f"against; keep it with checkpoints.epochs: [0].")
            found = criticality(str(done[name]), str(start), plan.alphas, plan.sigmas, plan.draws, plan.epsilon,
                                plan.admissible, plan.modules, **common)
            found["run"] = name
            results["criticality"].append(found)
    if plan.representations:
        ready = [pair for pair in plan.representations if all(n in done for n in pair)]
        found = representations(ready, done, **common) if ready else {"pairs": []}
        results["representations"] = {**found, "skipped": [list(p) for p in plan.representations if p not in ready]}
    return results




def analyse(study: Study, trainer: L.Trainer, states: dict[str, RunState]) -> tuple[Optional[dict], Optional[dict]]:
    """The study's passes (``cka:`` and ``transfer:`` in its file), each written by the first process; returns their
    results (None for a part the study has not, or whose runs have not finished)."""
    cka = study_cka(study, trainer, states) if study.cka is not None else None
    transfer = None
    if study.transfer is not None:
        start = time.perf_counter()
        transfer = analyse_transfer(study, trainer, states)
        if trainer.is_global_zero:
            write_json(study.report, "transfer.json", transfer)
            seconds = time.perf_counter() - start
            print(f"transfer: {len(transfer['barriers'])} barrier pairs, {len(transfer['criticality'])} criticality runs, "
                  f"{len(transfer.get('representations', {}).get('pairs', []))} representation pairs: {seconds:.0f} s",
                  flush=True)
            record_time(study.report, "transfer analysis", seconds)
    return cka, transfer
