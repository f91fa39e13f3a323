"""The report: statistics against scipy on synthetic runs, partial studies, mixed configs, nothing to report."""

import csv
import itertools
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
    assert f"= {rho:.2f} (p = {p:.3g}; two-sided, scipy.stats.spearmanr's t-distribution approximation)" in report
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
    from study.statistics import anova_objective_p

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
    from study.finetuning import table_two

    def run(objective, target, acc):
        return {"kind": "P-T", "block_shuffle": None, "pretraining_epoch": 5, "pretraining_objective": objective,
                "target": target, "measure": "top1", "curve": {"accuracy": [(10, acc / 2), (20, acc)], "loss": []}}

    runs = [run("Softmax", t, v) for t, vs in (("a", (0.80, 0.81, 0.79)), ("b", (0.60, 0.61, 0.59))) for v in vs]
    runs += [run("SquaredError", t, v) for t, vs in (("a", (0.70, 0.71, 0.69)), ("b", (0.60, 0.62, 0.58))) for v in vs]
    lines = table_two(runs)
    softmax, squared = (next(l for l in lines if l.startswith(f"| {o} |")) for o in ("Softmax", "SquaredError"))
    assert softmax == "| Softmax | **80.0 ± 0.6** | **60.0 ± 0.6** | **70.0** |"
    assert squared.startswith("| SquaredError | 70.0 ± 0.6 | **60.0 ± 1.2** |") and not squared.endswith("**65.0** |")


def test_the_talks_findings_compare_p_t_and_ri_t_within_each_target_and_shuffling_against_its_own_run():
    """Two targets (the sketch domain and the texture contrast): P-T is compared with RI-T of its own target, and a
    block-shuffled run's relative drop with the un-shuffled run of its kind and target, never across targets."""
    from study.finetuning import _groups, _summary, findings, main_arms

    def run(experiment, kind, target, acc, block=None, seed=0):
        return {"run": f"{experiment}/seed{seed}", "experiment": experiment, "seed": seed, "kind": kind,
                "target": target, "block_shuffle": block, "pretraining_epoch": 15 if kind == "P-T" else None,
                "measure": "top1", "curve": {"accuracy": [(10, acc / 2), (20, acc)], "loss": [(20, 1.0)]}}

    runs = [run("pretrain", "pre-training", "shapes", 0.6), run("p_t", "P-T", "sketch", 0.9), run("ri_t", "RI-T", "sketch", 0.6),
            run("p_t_texture", "P-T", "texture", 0.5), run("ri_t_texture", "RI-T", "texture", 0.8),
            run("p_t_block4", "P-T", "sketch", 0.45, block=4), run("ri_t_block4", "RI-T", "sketch", 0.48, block=4)]
    groups = _groups(runs)
    assert main_arms(groups) == {"sketch": {"P-T": "p_t", "RI-T": "ri_t"}, "texture": {"P-T": "p_t_texture", "RI-T": "ri_t_texture"}}
    text = "\n".join(findings(groups, {n: _summary(g) for n, g in groups.items()}, {"runs": runs, "barriers": [], "criticality": []}))
    assert "On sketch, P-T trains better than RI-T (90.0 % vs 60.0 %" in text
    assert "On texture, P-T trains no better than RI-T (50.0 % vs 80.0 %" in text
    assert "-3.0 points at 4 px blocks (sketch)" in text
    assert "P-T's relative drop in test accuracy under block shuffling, against its un-shuffled run: 50.0 % at 4 px (sketch)" in text
    assert "RI-T's relative drop in test accuracy under block shuffling, against its un-shuffled run: 20.0 % at 4 px (sketch)" in text


def test_which_checkpoint_transfers_best_compares_epochs_of_one_pretraining_not_objectives():
    """Table 2's study fine-tunes every objective from its last checkpoint: no finding about checkpoints. The transfer
    study's by-epoch arms start from one pre-training run at several epochs: compared by epoch, that objective's only."""
    from study.finetuning import _groups, _summary, findings

    def run(experiment, objective, epoch, acc):
        return {"run": f"{experiment}/seed0", "experiment": experiment, "seed": 0, "kind": "P-T", "target": "sketch",
                "block_shuffle": None, "pretraining_epoch": epoch, "pretraining_objective": objective, "measure": "top1",
                "curve": {"accuracy": [(10, acc / 2), (20, acc)], "loss": [(20, 1.0)]}}

    def said(runs):
        groups = _groups(runs)
        return "\n".join(findings(groups, {n: _summary(g) for n, g in groups.items()}, {"runs": runs, "barriers": [],
                                                                                        "criticality": []}))

    assert "Fine-tuned from pre-training epochs" not in said([run("softmax", "Softmax", 15, 0.86),
                                                             run("squared_error", "SquaredError", 15, 0.15)])
    text = said([run("p_t_epoch0", "Softmax", 0, 0.83), run("p_t", "Softmax", 15, 0.85), run("other", "SquaredError", 3, 0.2)])
    assert "Fine-tuned from pre-training epochs 0, 15: the best start is epoch 15 (85.0 %)" in text


def test_figure_5a_names_its_test_and_sets_only_the_papers_rho_beside_it(tmp_path):
    """The paper's p = 0.002 is not what scipy's test gives on its own nine points (p = 0.00024): the report gives
    the paper's ρ and says so, instead of setting two incomparable p-values side by side."""
    from study.report import paper_points, paper_values

    rng = np.random.default_rng(4)
    for experiment, shift in (("softmax", 0.0), ("sigmoid", 0.05), ("squared_error", 0.2)):
        for seed in range(2):
            write_run(tmp_path, experiment, seed, synthetic_values(rng, shift))
    report = write_report(collect_folder(tmp_path), tmp_path / "report").read_text()
    objectives, r2, transfer = paper_points(paper_values())
    assert len(objectives) == 9
    rho, p = stats.spearmanr(r2, transfer)  # the paper's Tables 3 and 1: ρ = −0.93, p = 0.00024
    assert round(rho, 2) == -0.93 and p == pytest.approx(2.36e-4, rel=0.01)
    line = next(l for l in report.splitlines() if l.startswith("Figure 5a"))
    assert f"The paper: ρ = {rho:.2f} over its 9 objectives" in line and f"gives p = {p:.2g} on them" in line
    assert "(p = 0.002)" not in report and "Its p = 0.002 does not follow" in line


def test_figure_5b_names_its_test_and_the_papers_rho_within_table_four(tmp_path):
    from study.report import paper_points, paper_values

    rng = np.random.default_rng(5)
    for tau in ("0.01", "0.05", "0.08"):
        for seed in range(2):
            write_run(tmp_path, f"tau_{tau}", seed, synthetic_values(rng, float(tau)))
    report = write_report(collect_folder(tmp_path), tmp_path / "report").read_text()
    line = next(l for l in report.splitlines() if l.startswith("Figure 5b"))
    temperatures, r2, transfer = paper_points(paper_values(), "table4")
    assert len(temperatures) == 8
    assert "(p = " in line and "scipy.stats.spearmanr's t-distribution approximation" in line
    assert f"The paper: ρ = {stats.spearmanr(r2, transfer).statistic:.2f} over its 8 temperatures (Table 4)." in line


def test_the_tables_say_which_t_test_ran_and_bold_by_it(tmp_path):
    """Welch's (default) and Student's differ here: 3 seeds each, one row spread 8 times more than the best."""
    from study.statistics import Cell, column

    best, other = [80.0, 80.2, 79.8], [77.0, 78.6, 75.4]
    welch = stats.ttest_ind(other, best, equal_var=False).pvalue
    student = stats.ttest_ind(other, best, equal_var=True).pvalue
    assert student < 0.05 <= welch  # the case where the choice matters
    for test, p in (("welch", welch), ("student", student)):
        cells = column({"best": Cell(best), "other": Cell(other)}, test=test)
        assert cells["best"].bold and cells["other"].p_vs_best == pytest.approx(p, rel=1e-12)
        assert cells["other"].bold == (p >= 0.05)
    with pytest.raises(ValueError, match="choose one of welch, student"):
        column({"best": Cell(best)}, test="paired")

    rng = np.random.default_rng(6)
    for experiment, shift in (("softmax", 0.0), ("sigmoid", 0.005)):
        for seed in range(3):
            write_run(tmp_path, experiment, seed, synthetic_values(rng, shift))
    for test, name in (("welch", "Welch's"), ("student", "Student's")):
        report = write_report(collect_folder(tmp_path), tmp_path / test, t_test=test).read_text()
        assert f"(two-sided {name} t-test, p ≥ 0.05;" in report


def test_table_two_offers_student_and_welch_and_says_which_ran(tmp_path):
    from study.runs import Collected
    from study.finetuning import table_two

    def run(objective, acc):
        return {"kind": "P-T", "block_shuffle": None, "pretraining_epoch": 5, "pretraining_objective": objective,
                "experiment": f"p_t_{objective}", "target": "a", "measure": "top1",
                "curve": {"accuracy": [(10, acc / 2), (20, acc)], "loss": []}}

    runs = [run("Softmax", v / 100) for v in (80.0, 80.2, 79.8)] + [run("Sigmoid", v / 100) for v in (77.0, 78.6, 75.4)]
    for test, name, bold in (("welch", "Welch's", True), ("student", "Student's", False)):
        lines = table_two(runs, test=test)
        assert any(f"a two-sided {name} t-test" in l for l in lines)
        sigmoid = next(l for l in lines if l.startswith("| Sigmoid |"))
        assert sigmoid.startswith("| Sigmoid | **") == bold  # p = 0.081 (Welch), 0.032 (Student)
    assert any("Welch's" in l for l in table_two(runs))  # the default
    transfer = {"runs": runs, "barriers": [], "criticality": []}  # the report's choice reaches Table 2
    report = write_report(Collected(), tmp_path, transfer=transfer, t_test="student").read_text()
    assert "a two-sided Student's t-test" in report and "| Sigmoid | 77.0 ± 0.9 |" in report


EXPERIMENTS = ("softmax", "sigmoid", "squared_error")


def cka_of_two_seeds(rng, seeds=(0, 1)):
    """A cka.json as study_cka writes it for two seeds, its runs in an order of their own (experiment by experiment)."""
    runs = [f"{e}/seed{s}" for e in EXPERIMENTS for s in seeds]
    m = rng.uniform(0.3, 0.95, (len(runs), len(runs)))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    agreement = [{"a": a, "b": b, "agreement": rng.uniform(0.5, 0.9), "both_right_or_both_wrong": rng.uniform(0.6, 0.9),
                  "both_wrong": rng.uniform(0.1, 0.3), "shared_wrong": rng.uniform(0.2, 0.6)}
                 for a, b in itertools.combinations(runs, 2)]
    return {"pairs": [], "matrix": {"layer": "penultimate", "runs": runs, "cka": m.tolist(), "seed": seeds[0],
                                    "column_seed": seeds[1] if len(seeds) > 1 else None}, "agreement": agreement}


def spread(values, digits=2):
    return f"mean {np.mean(values):.{digits}f}, min {np.min(values):.{digits}f}, max {np.max(values):.{digits}f}"


def test_figure_2b_has_rows_of_one_seed_and_columns_of_another_so_its_diagonal_is_two_initialisations(tmp_path):
    from study.cka import cka_parts, cross_seed

    cka = cka_of_two_seeds(np.random.default_rng(7))
    runs, m = cka["matrix"]["runs"], np.array(cka["matrix"]["cka"])
    at = lambda a, b: m[runs.index(a), runs.index(b)]  # noqa: E731
    diagonal = [at(f"{e}/seed0", f"{e}/seed1") for e in EXPERIMENTS]
    off = [at(f"{e}/seed0", f"{f}/seed1") for e in EXPERIMENTS for f in EXPERIMENTS if e != f]
    assert max(diagonal) < 1

    block = cross_seed(cka["matrix"])
    assert block.rows == [f"{e}/seed0" for e in EXPERIMENTS] and block.columns == [f"{e}/seed1" for e in EXPERIMENTS]
    np.testing.assert_array_equal(np.diag(block.cka), diagonal)
    lines, figures = cka_parts(cka, tmp_path)
    text = "\n".join(lines)
    assert ("rows: the experiments' runs of seed 0, columns: their runs of seed 1. Same objective, different "
            f"initialisation (the diagonal, 3 experiments): {spread(diagonal)}; different objectives (off the diagonal, "
            f"6 pairs of runs): {spread(off)}.") in text
    assert f"softmax {diagonal[0]:.2f}, sigmoid {diagonal[1]:.2f}, squared_error {diagonal[2]:.2f}." in text
    assert all(f.stat().st_size > 1000 for f in figures)


def test_figure_2b_of_one_seed_says_its_diagonal_is_a_run_with_itself():
    from study.cka import cka_section

    cka = cka_of_two_seeds(np.random.default_rng(8), seeds=(0,))
    m = np.array(cka["matrix"]["cka"])
    text = "\n".join(cka_section(cka))
    assert f"CKA between the 3 runs of seed 0: between different runs {spread(m[~np.eye(3, dtype=bool)])}" in text
    assert "the diagonal compares each run with itself (1 by definition, the study has one seed)" in text


def test_agreement_is_reported_within_and_between_objectives_over_every_seed_pair():
    """Figure C.4 as the paper compares it: two seeds of one objective against runs of different objectives."""
    from study.cka import agreement_matrix, cka_section

    cka = cka_of_two_seeds(np.random.default_rng(9), seeds=(0, 1, 2))
    cka["agreement"][0]["shared_wrong"] = float("nan")  # no image wrong for both: left out, not averaged as 0
    rows = cka["agreement"]
    of = lambda name: name.split("/")[0]  # noqa: E731
    text = "\n".join(cka_section(cka))
    seed = lambda name: name.split("/seed")[1]  # noqa: E731
    for e in EXPERIMENTS:
        within = [r for r in rows if of(r["a"]) == of(r["b"]) == e]
        mine = [r for r in rows if (of(r["a"]) == e) != (of(r["b"]) == e)]
        between = [r for r in mine if seed(r["a"]) != seed(r["b"])]
        same_seed = [r for r in mine if seed(r["a"]) == seed(r["b"])]
        # 3 seed pairs within; 3 x 3 runs against each other experiment, of which 3 share a seed (an initialisation)
        assert len(within) == 3 and len(between) == 2 * 6 and len(same_seed) == 2 * 3
        cells = [spread([r[k] for r in group if math.isfinite(r[k])], 3)
                 for k, group in (("agreement", within), ("agreement", between), ("agreement", same_seed),
                                  ("shared_wrong", within), ("shared_wrong", between))]
        assert f"| {e} | " + " | ".join(cells) + " |" in text
    within = [r["agreement"] for r in rows if of(r["a"]) == of(r["b"])]
    between = [r["agreement"] for r in rows if of(r["a"]) != of(r["b"]) and seed(r["a"]) != seed(r["b"])]
    assert f"| all (9 pairs within, 18 between, 9 same seed) | {spread(within, 3)} | {spread(between, 3)} |" in text

    names, matrix = agreement_matrix(rows, "agreement")
    assert names == list(EXPERIMENTS)
    for (i, e), (j, f) in itertools.product(enumerate(EXPERIMENTS), repeat=2):
        pairs = [r["agreement"] for r in rows if {of(r["a"]), of(r["b"])} == {e, f} and seed(r["a"]) != seed(r["b"])
                 and (e != f or of(r["a"]) == of(r["b"]))]
        assert matrix[i, j] == pytest.approx(np.mean(pairs), rel=1e-12)  # the diagonal: seeds of one objective, not 1
    names, shared = agreement_matrix(rows, "shared_wrong")
    first = rows[0]
    assert np.isfinite(shared).all() and of(first["a"]) == of(first["b"]) == "softmax"
    softmax = [r["shared_wrong"] for r in rows if of(r["a"]) == of(r["b"]) == "softmax" and math.isfinite(r["shared_wrong"])]
    assert len(softmax) == 2 and shared[0, 0] == pytest.approx(np.mean(softmax), rel=1e-12)


def test_one_basin_is_decided_on_the_barriers_interval():
    from study.barriers import one_basin

    assert one_basin({"error_barrier": 0.0, "error_barrier_interval": [0.0, 1 - 495 / 500]}) is True  # 5 of 500 images
    assert one_basin({"error_barrier": 0.004, "error_barrier_interval": [0.0, 0.03]}) is None  # the images cannot tell
    assert one_basin({"error_barrier": 0.3, "error_barrier_interval": [0.25, 0.33]}) is False
    assert one_basin({"error_barrier": 0.02}) is False  # a result without an interval: the barrier itself


def made_up_representations(rng) -> dict:
    """A transfer.json's ``representations`` as ``study.cka.representations`` writes it, with random numbers."""
    layers = ["stem", "layer1.0", "layer2.0", "penultimate"]

    def pair(a, b, head):
        cka = rng.uniform(0, 1, len(layers))
        distance = {"stem": rng.uniform(1, 5), "layer1.0": rng.uniform(1, 5), "layer2.0": rng.uniform(1, 5)}
        if head:
            distance["head"] = rng.uniform(1, 5)
        distance["all"] = math.sqrt(sum(v**2 for v in distance.values()))
        split = rng.dirichlet(np.ones(4))
        errors = {"a": a, "b": b, "agreement": rng.uniform(0, 1), "both_right_or_both_wrong": split[0] + split[3],
                  "shared_wrong": rng.uniform(0, 1), "both_right": split[0], "a_right_alone": split[1],
                  "b_right_alone": split[2], "both_wrong": split[3]} if head else None
        return {"a": a, "b": b, "cka": dict(zip(layers, cka)), "cka_matrix": np.diag(cka).tolist(), "distance": distance,
                "left_out": [] if head else ["head.weight", "head.bias"], "classes": [6, 6 if head else 60], "errors": errors}

    pairs = [pair("p_t/seed0", "pretrain/seed0", False), pair("p_t/seed0", "p_t/seed1", True),
             pair("p_t/seed0", "ri_t/seed0", True), pair("ri_t/seed0", "ri_t/seed1", True)]
    return {"pairs": pairs, "layers": layers, "images_of": "p_t/seed0", "skipped": [["ri_t/seed0", "pretrain/seed0"]],
            "images": {"seed": 0, "epochs": 1, "val": {"images": 300, "classes": 6, "sha256": "0" * 64}}}


def test_the_transfer_section_draws_the_talks_three_tables_and_does_without_them(tmp_path):
    from study.finetuning import transfer_section

    def run(name, kind):
        return {"run": name, "experiment": name.split("/")[0], "seed": int(name[-1]), "kind": kind, "pretraining_epoch": None,
                "hyper": "", "block_shuffle": None, "validation_split": None, "target": "texture", "measure": "top1",
                "curve": {"accuracy": [], "loss": []}}

    runs = [run("pretrain/seed0", "pre-training"), run("p_t/seed0", "P-T"), run("p_t/seed1", "P-T"), run("ri_t/seed0", "RI-T"),
            run("ri_t/seed1", "RI-T")]
    found = made_up_representations(np.random.default_rng(3))
    lines, _ = transfer_section({"runs": runs, "barriers": [], "criticality": [], "representations": found}, tmp_path)
    text = "\n".join(lines)
    assert "300 test images of p_t/seed0's target (6 classes), drawn class-balanced from seed 0" in text
    assert "Pairs not computed, a run is not finished: ri_t/seed0 – pretrain/seed0." in text
    assert "| pair | kinds | stem | layer1.0 | layer2.0 | penultimate |" in text
    assert "| pair | kinds | all | stem | layer1.0 | layer2.0 | head | left out |" in text
    kinds = ["P-T & P", "P-T & P-T", "P-T & RI-T", "RI-T & RI-T"]
    for pair, kind in zip(found["pairs"], kinds):
        label = f"| {pair['a']} – {pair['b']} | {kind} |"
        cka = " | ".join(f"{pair['cka'][l]:.3f}" for l in found["layers"])
        assert f"{label} {cka} |" in text
        d = pair["distance"]
        head = f"{d['head']:.2f}" if "head" in d else "–"
        left = ", ".join(pair["left_out"]) or "none"
        assert (f"{label} {d['all']:.2f} | {d['stem']:.2f} | {d['layer1.0']:.2f} | {d['layer2.0']:.2f} | {head} | {left} |"
                in text)
        e = pair["errors"]
        if e is None:  # the pre-trained head has other classes: no row of errors
            assert sum(line.startswith(label) for line in lines) == 2
            continue
        row = [100 * e[k] for k in ("agreement", "shared_wrong", "both_right", "a_right_alone", "b_right_alone", "both_wrong")]
        assert f"{label} " + " | ".join(f"{v:.1f}" for v in row) + " |" in text
    pt, rit = found["pairs"][1], found["pairs"][3]
    closer = "closer" if pt["distance"]["all"] < rit["distance"]["all"] else "not closer"
    assert (f"- ‖θ_a − θ_b‖₂: P-T & P-T {pt['distance']['all']:.2f}, RI-T & RI-T {rit['distance']['all']:.2f}: two P-T runs "
            f"are {closer} to each other than two RI-T runs.") in text
    assert f"- CKA of the stem: P-T & P-T {pt['cka']['stem']:.3f}, P-T & P {found['pairs'][0]['cka']['stem']:.3f}" in text
    # A transfer.json written before these tables: the section stands without them.
    lines, _ = transfer_section({"runs": runs, "barriers": [], "criticality": []}, tmp_path)
    assert any(l.startswith("### Fine-tuning: P-T") for l in lines) and not any("Representations" in l for l in lines)


DEV_ONLY = {"sklearn", "pytest", "_pytest"}  # what `pip install .[dev]` adds


def test_a_report_needs_no_dev_dependency(tmp_path):
    """``python -m study report`` on finished runs in a process that cannot import the dev extras (scikit-learn,
    pytest), as after ``pip install .``."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    rng = np.random.default_rng(0)
    for experiment in ("softmax", "sigmoid", "squared_error"):
        for seed in range(2):
            write_run(tmp_path / "runs", experiment, seed, synthetic_values(rng, 0.0))
    hidden = tmp_path / "hidden"  # found first on the path: importing a dev extra fails as if it were not installed
    for name in DEV_ONLY:
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} is a dev dependency (pip install .[dev])')")
    done = subprocess.run([sys.executable, "-m", "study", "report", str(tmp_path / "runs")], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(hidden)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Table 1" in (tmp_path / "runs" / "report" / "report.md").read_text()
