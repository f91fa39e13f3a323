"""The report: statistics against scipy on synthetic runs, partial studies, mixed configs, nothing to report."""

import csv
import json
import math
import re

import numpy as np
import pytest
import yaml
from scipy import stats

from study.report import ReportError, write_report
from study.runs import MixedConfigs, collect_folder

OBJECTIVES = {"softmax": "Softmax", "sigmoid": "Sigmoid", "squared_error": "SquaredError"}


def write_run(root, experiment, seed, values, config_extra=None, finished=True, measured=True):
    folder = root / experiment / f"seed{seed}"
    (folder / "checkpoints").mkdir(parents=True)
    config = {"seed_everything": seed, "model": {"objective": OBJECTIVES.get(experiment, "CosineSoftmax"), "lr_per_256": 0.2,
                                                 **(config_extra or {})}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if finished:
        (folder / "checkpoints" / "finished.json").write_text(json.dumps({"epochs": 2, "global_step": 20, "max_epochs": 2, "max_steps": -1}))
    if measured:
        objective = {"class_path": f"lightning_modules.objectives.{OBJECTIVES.get(experiment, 'CosineSoftmax')}",
                     "init_args": {"temperature": 0.05} if experiment.startswith("tau") else {}}
        if experiment.startswith("tau"):
            objective["init_args"]["temperature"] = float(experiment[4:])
        evaluations = [{"epoch": 0, "step": 10, "measurements": {k: v / 2 for k, v in values.items()}},
                       {"epoch": 1, "step": 20, "measurements": values}]
        (folder / "measurements.json").write_text(json.dumps({
            "objective": objective, "hparams": {"backbone": "resnet10t", "num_classes": 60},
            "config": yaml.safe_dump(config), "evaluations": evaluations}))
    return folder


def synthetic_values(rng, shift):
    return {"val/acc1": 0.5 + shift + 0.02 * rng.standard_normal(), "class_separation/train/penultimate": 0.4 + shift + 0.01 * rng.standard_normal(),
            "class_separation/val/penultimate": 0.3, "relu_nonzero/penultimate": 0.6 - shift,
            "relu_nonzero/layer1.0": 0.5, "class_separation/train/layer1.0": 0.1,
            "probe/texture/linear_acc": 0.6 - shift + 0.02 * rng.standard_normal(), "probe/texture/knn_acc": 0.4,
            "probe/other/linear_acc": 0.5 - shift + 0.02 * rng.standard_normal(), "probe/other/knn_acc": 0.3}


def cell(report: str, row: str, column: int) -> str:
    line = next(l for l in report.splitlines() if l.startswith(f"| {row} |"))
    return line.split(" | ")[column].strip(" |")


def test_table_cells_bold_and_spearman_agree_with_scipy(tmp_path):
    rng = np.random.default_rng(0)
    truth = {}
    for experiment, shift in (("softmax", 0.0), ("sigmoid", 0.005), ("squared_error", 0.2)):
        truth[experiment] = [synthetic_values(rng, shift) for _ in range(3)]
        for seed, values in enumerate(truth[experiment]):
            write_run(tmp_path, experiment, seed, values)
    report = write_report(collect_folder(tmp_path), tmp_path / "report").read_text()

    top1 = {e: [100 * v["val/acc1"] for v in runs] for e, runs in truth.items()}
    for experiment, values in top1.items():
        text = cell(report, OBJECTIVES[experiment], 2)
        assert f"{np.mean(values):.1f} ± {stats.sem(values):.1f}" in text
        best = max(top1, key=lambda e: np.mean(top1[e]))
        p = stats.ttest_ind(values, top1[best], equal_var=False).pvalue
        assert text.startswith("**") == (experiment == best or p >= 0.05)
    assert cell(report, "SquaredError", 2).startswith("**")  # the best, clearly
    assert not cell(report, "Softmax", 2).startswith("**")
    assert cell(report, "Softmax", 4).startswith("**") and not cell(report, "SquaredError", 4).startswith("**")

    r2 = [np.mean([v["class_separation/train/penultimate"] for v in runs]) for runs in truth.values()]
    transfer = [np.mean([(v["probe/texture/linear_acc"] + v["probe/other/linear_acc"]) / 2 for v in runs]) for runs in truth.values()]
    rho, p = stats.spearmanr(r2, transfer)
    assert f"= {rho:.2f} (p = {p:.3g})" in report
    assert "| Sigmoid | 3 |" in report  # the number of seeds in its column

    rows = list(csv.DictReader((tmp_path / "report" / "results.csv").open()))
    assert len(rows) == 9 * 2 * len(truth["softmax"][0])  # run x evaluation x metric
    row = next(r for r in rows if r["run"] == "sigmoid/seed2" and r["step"] == "20" and r["metric"] == "val/acc1")
    assert float(row["value"]) == truth["sigmoid"][2]["val/acc1"] and row["objective"] == "Sigmoid"
    for figure in ("figure3_sparsity_by_layer.png", "figure4_r2_by_layer.png", "figure5_r2_vs_transfer.png"):
        assert (tmp_path / "report" / figure).stat().st_size > 1000


def test_temperature_sweep_gets_table_four_with_spearman_within_it(tmp_path):
    rng = np.random.default_rng(1)
    for tau in ("0.01", "0.05", "0.08"):
        for seed in range(2):
            write_run(tmp_path, f"tau_{tau}", seed, synthetic_values(rng, float(tau)))
    report = write_report(collect_folder(tmp_path), tmp_path / "report").read_text()
    assert "## Table 4" in report and "| τ = 0.01 | 2 |" in report and "Figure 5b" in report


def test_partial_study_lists_missing_runs_and_uneven_seeds(tmp_path):
    rng = np.random.default_rng(2)
    for seed in range(2):
        write_run(tmp_path, "softmax", seed, synthetic_values(rng, 0))
    write_run(tmp_path, "sigmoid", 0, synthetic_values(rng, 0))
    write_run(tmp_path, "sigmoid", 1, {}, measured=False)  # finished without measurements
    write_run(tmp_path, "squared_error", 0, {}, finished=False, measured=False)
    report = write_report(collect_folder(tmp_path), tmp_path / "report").read_text()
    assert re.search(r"- sigmoid/seed1: finished at step 20 without measurements.json", report)
    assert "- squared_error/seed0: not run" in report
    assert "Partial" in report and "'sigmoid': 1" in report
    assert "| Sigmoid | 1 |" in report  # averaged over the one seed it has, and says so


def test_runs_of_one_experiment_with_other_configs_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    write_run(tmp_path, "softmax", 0, synthetic_values(rng, 0))
    write_run(tmp_path, "softmax", 1, synthetic_values(rng, 0), config_extra={"lr_per_256": 0.4})
    with pytest.raises(MixedConfigs, match=r"softmax/seed0 and softmax/seed1 .*model.lr_per_256: 0.2 -> 0.4"):
        write_report(collect_folder(tmp_path), tmp_path / "report")


def test_a_report_over_no_runs_says_where_it_looked(tmp_path):
    write_run(tmp_path, "softmax", 0, {}, finished=False, measured=False)
    with pytest.raises(ReportError, match=rf"Looked in:\n  {re.escape(str(tmp_path))}(.|\n)*softmax/seed0: not run"):
        write_report(collect_folder(tmp_path), tmp_path / "report")


def test_two_way_anova_of_the_objective_matches_the_textbook_balanced_formula():
    from study.report import anova_objective_p

    rng = np.random.default_rng(0)
    a, b, n = 2, 3, 4  # objectives, data sets, seeds
    y = rng.normal(size=(a, b, n)) + np.array([0.0, 0.8])[:, None, None] + np.array([0.0, 2.0, -1.0])[None, :, None]
    rows = [(f"o{i}", f"d{j}", float(y[i, j, k])) for i in range(a) for j in range(b) for k in range(n)]
    ss_a = b * n * ((y.mean((1, 2)) - y.mean()) ** 2).sum()
    ss_e = ((y - y.mean(2, keepdims=True)) ** 2).sum()
    f = (ss_a / (a - 1)) / (ss_e / (a * b * (n - 1)))
    assert anova_objective_p(rows) == pytest.approx(stats.f.sf(f, a - 1, a * b * (n - 1)), rel=1e-9)
    assert math.isnan(anova_objective_p([(o, d, v) for o, d, v in rows if o == "o0"]))  # one objective: no test


def test_table_two_bolds_by_t_test_per_data_set_and_anova_for_the_average():
    from study.transfer_report import table_two

    def run(objective, target, acc):
        return {"kind": "P-T", "block_shuffle": None, "pretraining_epoch": 5, "pretraining_objective": objective,
                "target": target, "measure": "top1", "curve": {"accuracy": [(10, acc / 2), (20, acc)], "loss": []}}

    runs = [run("Softmax", t, v) for t, vs in (("a", (0.80, 0.81, 0.79)), ("b", (0.60, 0.61, 0.59))) for v in vs]
    runs += [run("SquaredError", t, v) for t, vs in (("a", (0.70, 0.71, 0.69)), ("b", (0.60, 0.62, 0.58))) for v in vs]
    lines = table_two(runs)
    softmax, squared = (next(l for l in lines if l.startswith(f"| {o} |")) for o in ("Softmax", "SquaredError"))
    assert softmax == "| Softmax | **80.0 ± 0.6** | **60.0 ± 0.6** | **70.0** |"
    assert squared.startswith("| SquaredError | 70.0 ± 0.6 | **60.0 ± 1.2** |") and not squared.endswith("**65.0** |")
