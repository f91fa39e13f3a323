"""The study layer end to end on the embedded shapes data: the study file, the sweep's skip/resume, the
between-model pass on the Trainer (hooks, 1 vs 2 processes), and the errors said before any work."""

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import cli
from callbacks.preemption import Preempted
from lightning_modules import ObjectiveClassifier
from measurements import gram
from callbacks.run_config import name_run, objective_slug
from cli import run_folder
from study.launch import run_locally
from study.passes import ComparisonError, Loaded, check_comparable
from study.plan import stages
from study.runs import run_config, run_states
from study.spec import Study, StudyError

from .conftest import REPO
from .helpers import SignalAt
from .test_training import NO_MEASUREMENTS, TINY


def experiment_config(tmp_path: Path, shapes_root: Path, name: str, objective: str) -> Path:
    """The quickstart config with another objective and the test's data, as its own file (an experiment)."""
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["model"]["objective"] = objective
    config["data"]["init_args"]["root"] = str(shapes_root)
    config["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def study_file(tmp_path: Path, configs: list[Path], seeds=(0,), extra: str = "", overrides=()) -> Path:
    path = tmp_path / "study.yaml"
    overrides = [*TINY, "--trainer.max_epochs=2", *overrides]
    path.write_text(yaml.safe_dump({"experiments": [str(c) for c in configs], "seeds": list(seeds), "overrides": overrides,
                                    "report": str(tmp_path / "report")}) + extra)
    return path


def test_a_study_names_its_problems_before_any_run_starts(tmp_path, shapes_root):
    good = experiment_config(tmp_path, shapes_root, "softmax", "Softmax")
    with pytest.raises(StudyError, match=r"experiment config .*missing\.yaml does not exist"):
        Study.load(study_file(tmp_path, [good, tmp_path / "missing.yaml"]))
    bad = experiment_config(tmp_path, shapes_root, "typo", "Softmaxx")
    with pytest.raises(StudyError, match=r"typo\.yaml: unknown objective 'Softmaxx'; choose one of .*CosineSoftmax"):
        Study.load(study_file(tmp_path, [good, bad]))
    with pytest.raises(StudyError, match=r"'softmax/seed3' is not one of the study's runs"):
        Study.load(study_file(tmp_path, [good], extra="cka: {pairs: [[softmax/seed0, softmax/seed3]]}\n"))
    study = Study.load(study_file(tmp_path, [good], seeds=(0, 4)))
    assert [r.name for r in study.runs] == ["softmax/seed0", "softmax/seed4"]
    assert run_states(study)["softmax/seed4"].folder == tmp_path / "runs" / "softmax" / "seed4"
    # A variant of a config: its own name, overrides (before the study's) and seeds.
    variant = f"- {{name: wide, config: {good}, seeds: [2], overrides: [--trainer.default_root_dir={tmp_path / 'wide'}]}}\n"
    study = Study.load(_with_experiment(study_file(tmp_path, [good]), variant))
    assert [r.name for r in study.runs] == ["softmax/seed0", "wide/seed2"]
    assert run_states(study)["wide/seed2"].folder == tmp_path / "wide" / "softmax" / "seed2"
    with pytest.raises(StudyError, match=r"an experiment is a config path, or \{name, config, overrides, seeds, grid\}"):
        Study.load(_with_experiment(study_file(tmp_path, [good]), f"- {{name: x, config: {good}, seed: 1}}\n"))
    for transfer, message in (("{pairs: [[softmax/seed0, softmax/seed9]]}", "'softmax/seed9' is not one of the study's runs"),
                              ("{pairs: [[softmax/seed0, softmax/seed0]], lambdas: []}", "transfer: The lambda grid is empty"),
                              ("{criticality: [softmax/seed0], sigmas: []}", "transfer: The sigma grid"),
                              ("{pair: []}", "unknown transfer keys")):
        with pytest.raises(StudyError, match=message):
            Study.load(study_file(tmp_path, [good], extra=f"transfer: {transfer}\n"))


def test_seed_in_an_override_is_the_runs_seed_and_a_grid_trains_every_seed(tmp_path, shapes_root):
    """Appendix A.3: fine-tuning seed k from pre-training seed k ({seed}), every grid point from each of them."""
    good = experiment_config(tmp_path, shapes_root, "softmax", "Softmax")
    start = "--model.init_from=" + str(tmp_path / "pre" / "seed{seed}" / "last.ckpt")
    entry = (f'- {{name: ft, config: {good}, seeds: [0, 2], overrides: ["{start}"], '
             f'grid: {{lr_per_256: [0.1, 0.2], lr_times_weight_decay: [null, 1.0e-5]}}}}\n')
    study = Study.load(_with_experiment(study_file(tmp_path, [good]), entry))
    grid = [r for r in study.runs if r.experiment.startswith("ft_grid")]
    assert [r.name for r in grid] == [f"ft_grid_lr{i}_wd{j}/seed{s}" for i in (0, 1) for j in (0, 1) for s in (0, 2)]
    for run in [*grid, study.find_run("ft/seed0"), study.find_run("ft/seed2")]:
        assert f"--model.init_from={tmp_path / 'pre' / f'seed{run.seed}' / 'last.ckpt'}" in run.overrides
    assert [r.name for r in study.runs if r.experiment == "softmax"] == ["softmax/seed0"]
    assert {"--model.lr_per_256=0.2", "--model.lr_times_weight_decay=1e-05"} <= set(study.find_run("ft_grid_lr1_wd1/seed2").overrides)
    with pytest.raises(StudyError, match=r"grid holds values that are not numbers.*write 1.0e-5"):
        Study.load(_with_experiment(study_file(tmp_path, [good]),
                                    f"- {{name: ft, config: {good}, grid: {{lr_per_256: [1e-5]}}}}\n"))
    # A grid of its own seeds: chosen from pre-trained network 2 alone, then refit from each.
    study = Study.load(_with_experiment(study_file(tmp_path, [good]), entry.replace("null, 1.0e-5]", "null], seeds: [2]")))
    assert [r.name for r in study.runs if r.experiment.startswith("ft")] == [
        "ft_grid_lr0_wd0/seed2", "ft_grid_lr1_wd0/seed2", "ft/seed0", "ft/seed2"]
    with pytest.raises(StudyError, match=r"seeds must be distinct non-negative integers"):
        Study.load(_with_experiment(study_file(tmp_path, [good]), entry.replace("null, 1.0e-5]", "null], seeds: [-1]")))


def test_a_study_parses_each_run_as_cli_fit_would_with_one_parser(tmp_path, shapes_root):
    """fit_config reuses its parser: each run's config must be what a parser of its own gives, nothing carried over."""
    good = experiment_config(tmp_path, shapes_root, "softmax", "Softmax")
    sigmoid = experiment_config(tmp_path, shapes_root, "sigmoid", "Sigmoid")
    runs = [["--config", str(good), "--seed_everything=3", f"--trainer.default_root_dir={tmp_path / 'elsewhere'}",
             "--model.lr_per_256=0.5"],
            ["--config", str(good), "--seed_everything=1"],
            ["--config", str(sigmoid), "--seed_everything=true", "--trainer.logger.init_args.version=named"],
            ["--config", str(good), "--seed_everything=1"]]
    parsed = [cli.fit_config(args) for args in runs]  # compared after all of them: none changed by a later parse
    for args, config in zip(runs, parsed):
        fresh = cli.parse_only(args).config
        name_run(fresh)
        fresh = fresh.as_dict()
        got = config.as_dict()
        if args[2] == "--seed_everything=true":  # drawn at random by each parse
            assert isinstance(got.pop("seed_everything"), int) and isinstance(fresh.pop("seed_everything"), int)
        assert got == fresh
    assert cli.run_folder(cli.fit_config(runs[1])) == tmp_path / "runs" / "softmax" / "seed1"


def test_a_run_parses_when_jsonargparse_cannot_read_a_signature_from_source(monkeypatch, capsys):
    """jsonargparse reads a signature with ``**kwargs`` from the class's source and, when that raises (CPython 3.11's
    ast.parse can, python/cpython#106905), falls back to the parent's: Lightning's TensorBoardLogger then asks for
    fabric's root_dir, the start-up that failed one full test run in six. The runs' logger (RunLogger) has a signature
    read without its source: with the source reader failing every time, the quickstart parses; Lightning's does not."""
    import jsonargparse._parameter_resolvers as resolvers

    def unreadable(*args, **kwargs):
        raise SystemError("AST constructor recursion depth mismatch (before=120, after=134)")

    monkeypatch.setattr(resolvers, "get_parameters_from_ast", unreadable)
    monkeypatch.chdir(REPO)
    config = cli.parse_only(["--config", "configs/quickstart.yaml"]).config
    name_run(config)
    assert cli.run_folder(config) == Path("runs/quickstart/softmax/seed0")
    with pytest.raises(SystemExit):  # the failure, made deterministic
        cli.parse_only(["--config", "configs/quickstart.yaml", "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger"])
    assert "root_dir" in capsys.readouterr().err


def test_runs_come_in_stages_after_the_runs_they_start_from(tmp_path, monkeypatch):
    """Fine-tuning after the pre-training run whose checkpoint it starts from, a refit after its grid: the order of
    ``study run`` and the array jobs of ``study submit``. A start that nothing trains and no file holds is an error
    before anything runs."""
    monkeypatch.chdir(REPO)
    study = Study.load("configs/studies/transfer.yaml")
    ordered = [[s.run.name for s in stage] for stage in stages(study, run_states(study))]
    # P-T and RI-T get the same grid: RI-T's grid needs nothing, its refit waits for it; P-T's waits for pre-training.
    grid = [f"grid_lr{i}_wd0/seed{s}" for i in (0, 1) for s in (0, 1)]
    # The texture contrast arms the same, from one seed.
    texture = [f"grid_lr{i}_wd0/seed0" for i in (0, 1)]
    assert ordered[0] == ["pretrain/seed0", *(f"ri_t_{g}" for g in grid), *(f"ri_t_texture_{g}" for g in texture),
                          "ri_t_block1/seed0", "ri_t_block4/seed0", "ri_t_block8/seed0"]
    assert ordered[1][:9] == [*(f"p_t_{g}" for g in grid), "ri_t/seed0", "ri_t/seed1",
                              *(f"p_t_texture_{g}" for g in texture), "ri_t_texture/seed0"]
    assert {n.split("/")[0] for n in ordered[1][9:]} == ({f"p_t_epoch{e}" for e in (0, 3, 6, 9)}
                                                         | {f"p_t_block{b}" for b in (1, 4, 8)})
    assert ordered[2] == ["p_t/seed0", "p_t/seed1", "p_t_texture/seed0"]
    spec = yaml.safe_load(Path("configs/studies/transfer.yaml").read_text())
    spec["experiments"] = spec["experiments"][2:3]  # ri_t alone, fine-tuning from a checkpoint nothing trains
    del spec["transfer"], spec["experiments"][0]["grid"]
    spec["experiments"][0]["overrides"] = [f"--model.init_from={tmp_path / 'gone.ckpt'}", f"--trainer.default_root_dir={tmp_path}"]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    alone = Study.load(tmp_path / "study.yaml")
    with pytest.raises(StudyError, match=r"ri_t/seed0 starts from .*gone\.ckpt \(model.init_from\), which does not exist and "
                                         r"which none of the study's runs trains"):
        stages(alone, run_states(alone))


def _with_experiment(path: Path, entry: str) -> Path:
    """The study file with one more experiment entry (YAML text) in its list."""
    spec = yaml.safe_load(path.read_text())
    spec["experiments"] += yaml.safe_load(entry)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_an_interrupted_study_finishes_without_redoing_finished_runs(tmp_path, shapes_root):
    configs = [experiment_config(tmp_path, shapes_root, "softmax", "Softmax"),
               experiment_config(tmp_path, shapes_root, "sigmoid", "Sigmoid")]
    study = Study.load(study_file(tmp_path, configs, overrides=[NO_MEASUREMENTS]))
    first, second = study.runs
    cli.main(["fit", *first.fit_args()])  # finished
    interrupted = cli.main(second.config_args(), run=False)  # preempted at step 20 of 32
    interrupted.trainer.callbacks.append(SignalAt(12, signal.SIGUSR1))
    with pytest.raises(Preempted):
        interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    states = run_states(study)
    assert [s.state for s in states.values()] == ["finished", "unfinished"]  # read from the folders when asked
    finished_checkpoint = states[first.name].folder / "checkpoints" / "last.ckpt"
    written = finished_checkpoint.stat().st_mtime_ns

    assert run_locally(study, states) == []
    assert finished_checkpoint.stat().st_mtime_ns == written  # not run again
    assert [s.state for s in states.values()] == ["finished", "finished"]
    resumed = torch.load(states[second.name].folder / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert resumed["global_step"] == 32  # 2 epochs of 16 steps: resumed at 20, not restarted
    events = list((states[second.name].folder).glob("events.out.tfevents.*"))
    assert len(events) == 2  # the interrupted part and the resumed part in one run folder


def resnet18_classifier(num_classes: int = 10) -> ObjectiveClassifier:
    return ObjectiveClassifier(num_classes=num_classes, global_batch_size=8, backbone="resnet18", backbone_source="torchvision",
                               zero_init_last_bn=False, ema_decay=None)


def test_the_hooks_see_every_block_once_after_its_residual_relu(tmp_path):
    """torchvision's BasicBlock applies one in-place ReLU twice; the Gram matrices must be those of each block's
    final output, taken before anything later in the network writes into it."""
    from study.cka import Comparison

    torch.manual_seed(0)
    module = resnet18_classifier().eval()
    loaded = Loaded("a", module, tmp_path / "a.ckpt", False)
    comparison = Comparison([loaded, Loaded("b", resnet18_classifier().eval(), tmp_path / "b.ckpt", False)],
                            [("a", "b")], None, [], agreement=False)
    images = torch.randn(6, 3, 32, 32)
    calls = {}
    blocks = module.eval_network.blocks()
    counting = [blocks[n].register_forward_hook(lambda m, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1)) for n in blocks]
    with torch.no_grad():
        grams, _ = comparison._forward(loaded, images)
    for handle in counting:
        handle.remove()
    assert calls == {n: 1 for n in blocks} and list(grams) == [*blocks, "penultimate"] or set(grams) == {*blocks, "penultimate"}

    # Reference: the network run block by block by hand, each output cloned at once.
    backbone = module.eval_network.backbone
    with torch.no_grad():
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
        outputs = {}
        for name, block in blocks.items():
            x = block(x)
            outputs[name] = x.clone()
        assert all((o >= 0).all() for o in outputs.values())  # after the block's ReLU
        for name, output in outputs.items():
            torch.testing.assert_close(grams[name], gram(output), rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(grams["penultimate"], gram(torch.flatten(backbone.avgpool(x), 1)), rtol=1e-6, atol=1e-6)


def test_networks_of_other_architectures_or_classes_are_refused_naming_both(tmp_path):
    a = Loaded("softmax/seed0", resnet18_classifier(10), tmp_path / "a.ckpt", False)
    b = Loaded("other/seed0", resnet18_classifier(12), tmp_path / "b.ckpt", False)
    with pytest.raises(ComparisonError, match=r"softmax/seed0 .*10 classes\) and other/seed0 .*12 classes\)"):
        check_comparable([a, b])


def test_cka_between_checkpoints_is_the_same_on_one_and_two_processes(tmp_path, shapes_root):
    trained = cli.main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), f"--data.init_args.root={shapes_root}",
                        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1", *TINY, NO_MEASUREMENTS,
                        "--trainer.limit_val_batches=0"])
    run = Path(trained.trainer.logger.log_dir)
    untrained = f"{run}@untrained"
    pairs = json.dumps([[str(run), str(run)], [str(run), untrained]])
    results = []
    for processes in (1, 2):
        out = tmp_path / f"cka{processes}"
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                               "-m", "study", "cka", f"--pairs={pairs}", f"--matrix=[{run}, {untrained}]", "--agreement=true",
                               "--batch_size=60", "--images=250", "--epochs=2", f"--out={out}", "--accelerator=cpu",
                               f"--devices={processes}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results.append(json.loads((out / "cka.json").read_text()))
        assert (out / "figure2_cka.png").stat().st_size > 1000
    one, two = results
    # The same batches on either count, so the same sums; float32 convolutions on 1 or 2 threads differ by ~1e-8.
    for p1, p2 in zip(one["pairs"], two["pairs"]):
        np.testing.assert_allclose(p1["cka"], p2["cka"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(one["matrix"]["cka"], two["matrix"]["cka"], rtol=0, atol=1e-6)
    assert one["agreement"] == two["agreement"]
    itself, control = np.array(one["pairs"][0]["cka"]), np.array(one["pairs"][1]["cka"])
    assert itself.shape == (len(one["pairs"][0]["layers_a"]),) * 2 == control.shape
    np.testing.assert_allclose(np.diag(itself), 1.0, atol=1e-12)
    assert np.all(np.diag(control) < 0.999) and np.all(control > 0)  # the untrained control is another network
    assert one["matrix"]["cka"][0][1] == pytest.approx(control[-1, -1], abs=1e-12)  # the same penultimate CKA both ways
    assert 0 <= one["agreement"][0]["agreement"] <= 1
    assert one["images"] == two["images"] and one["images"]["epochs"] == 2 and one["images"]["val"]["images"] == 250


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "studies").glob("*.yaml")))
def test_every_study_that_comes_with_the_code_plans_its_runs_as_a_full_parse_of_each_would(path, monkeypatch):
    """``run_states`` parses each experiment once and derives its runs: every derived run's folder, starting checkpoint,
    bounds and data equal a full parse of its arguments (all runs; of Table 2's 15,768, every 300th)."""
    monkeypatch.chdir(REPO)  # a study's paths are relative to the repository root
    study = Study.load(path)
    assert len(study.runs) >= len(study.experiments) >= 2
    states = run_states(study)
    assert list(states) == [r.name for r in study.runs]
    folders = [s.folder for s in states.values()]
    assert len(set(folders)) == len(folders)  # every run in a folder of its own
    assert all(s.folder.parts[-1] == f"seed{s.run.seed}" for s in states.values())
    for run in study.runs[::max(1, len(study.runs) // 50)]:
        full = run_config(run)
        init_from = Path(full.model.init_from) if full.model.init_from else None
        assert (states[run.name].folder, states[run.name].init_from) == (run_folder(full), init_from), run.name
        assert states[run.name].bounds == (full.trainer.max_epochs, full.trainer.max_steps)
        assert states[run.name].data == full.data.as_dict()


def test_a_seed_a_parse_cannot_leave_unfilled_is_planned_by_a_parse_per_run(tmp_path):
    path = study_file(tmp_path, [REPO / "configs" / "embedded" / "softmax.yaml"], seeds=(1, 2),
                      overrides=["--trainer.max_epochs={seed}", "--trainer.default_root_dir=" + str(tmp_path / "r{seed}")])
    states = run_states(Study.load(path))
    assert [s.bounds[0] for s in states.values()] == [1, 2]  # an integer: "{seed}" does not parse, each run does
    assert [s.folder for s in states.values()] == [tmp_path / f"r{k}" / "softmax" / f"seed{k}" for k in (1, 2)]


def test_every_embedded_experiment_builds_with_its_objective():
    for config in sorted((REPO / "configs" / "embedded").glob("*.yaml")):
        if config.name in ("data.yaml", "measurements.yaml"):
            continue
        built = cli.main(["--config", str(config)], run=False)
        assert built.model.hparams.num_classes == 60 and built.model.hparams.backbone == "test_resnet"
        assert objective_slug(built.model.hparams.objective) == config.stem
        assert [type(c).__name__ for c in built.trainer.callbacks][:2] == ["RepresentationMeasurements", "TransferProbes"]


@pytest.mark.parametrize("seeds, row_seed, column_seed", [((0, 1, 2), 1, 2), ((0, 3), 3, 0), ((0,), 0, None)])
def test_study_cka_puts_two_seeds_in_the_matrix_so_figure_2b_crosses_them(tmp_path, monkeypatch, seeds, row_seed, column_seed):
    """Figure 2b's diagonal is one objective from two initialisations: the matrix holds the runs of cka.seed and of the
    study's next seed (after the last: the first), with one seed that seed's alone; cka.json says which is which."""
    import study.analyse
    from study.analyse import study_cka

    configs = [REPO / "configs" / "embedded" / f"{name}.yaml" for name in ("softmax", "sigmoid")]
    spec = Study.load(study_file(tmp_path, configs, seeds=seeds, extra=f"cka: {{layer: penultimate, seed: {row_seed}}}\n"
                                                                       f"agreement: true\n"))
    states = {run.name: SimpleNamespace(state="finished", folder=tmp_path / run.name) for run in spec.runs}
    called = {}

    def compare(networks, pairs, matrix, layer, agreement, **kwargs):
        called.update(networks=networks, matrix=matrix, agreement=agreement)
        return {"pairs": [], "matrix": {"layer": layer, "runs": matrix, "cka": np.eye(len(matrix)).tolist()}, "agreement": []}

    monkeypatch.setattr(study.analyse, "compare", compare)
    study_cka(spec, SimpleNamespace(is_global_zero=True), states)
    expected = [f"{e}/seed{s}" for s in (row_seed, column_seed) if s is not None for e in ("softmax", "sigmoid")]
    assert called["matrix"] == expected and called["agreement"] is True
    assert called["networks"] == {n: str(tmp_path / n) for n in sorted(expected)}
    written = json.loads((tmp_path / "report" / "cka.json").read_text())["matrix"]
    assert (written["runs"], written["seed"], written["column_seed"]) == (expected, row_seed, column_seed)
