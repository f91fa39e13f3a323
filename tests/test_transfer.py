"""Fine-tuning (P-T and RI-T) and the passes on its checkpoints: barriers with batch-norm recomputed, parameter
distance, module criticality; on the embedded shapes data, end to end."""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cli
from datamodules import EmbeddedShapesDataModule
from lightning_modules import ObjectiveClassifier
from lightning_modules.classifier import PretrainingError
from study.__main__ import analyse
from measurements.cka import gram, unbiased_hsic
from measurements.weight_space import interpolate, negative_variance
from study.barriers import barrier, barrier_lines
from study.cka import representations
from study.criticality import criticality
from study.passes import (ComparisonError, Loaded, Logits, check_comparable, data_module_of, distance, load_network, pass_images,
                          shared_distance)
from study.plan import grid_scores, with_chosen_point
from study.runs import run_states
from study.spec import Study, StudyError

from .helpers import scalars

REPO = Path(__file__).resolve().parents[1]
SIZES = ["--data.init_args.num_train=1024", "--data.init_args.num_val=256", "--data.init_args.num_transfer_train=128",
         "--data.init_args.num_transfer_test=128"]


def transfer_study(root: Path, shapes_root: Path) -> Path:
    """A small transfer study: one pre-training epoch; P-T (two seeds) and RI-T fine-tuned for 8 steps from it."""
    configs = REPO / "configs" / "transfer"
    tune = ["--data.init_args.global_batch_size=32", "--trainer.max_steps=8", "--trainer.val_check_interval=4"]
    spec = {
        "experiments": [
            {"name": "pretrain", "config": str(configs / "pretrain.yaml"), "seeds": [0],
             "overrides": ["--trainer.max_epochs=1", "--checkpoints.epochs=[0]", "--data.init_args.global_batch_size=64",
                           f"--trainer.default_root_dir={root / 'pre'}"]},
            {"name": "p_t", "config": str(configs / "finetune.yaml"),
             "overrides": [f"--model.init_from={root / 'pre' / 'softmax' / 'seed0' / 'checkpoints' / 'last.ckpt'}",
                           f"--trainer.default_root_dir={root / 'p_t'}", *tune],
             "grid": {"lr_per_256": [0.02, 0.2], "lr_times_weight_decay": [None], "validation_split": 0.25}},
            {"name": "ri_t", "config": str(configs / "finetune.yaml"), "seeds": [0],
             "overrides": ["--model.init_from=null", f"--trainer.default_root_dir={root / 'ri_t'}", *tune]},
        ],
        "seeds": [0, 1],
        "overrides": [f"--data.init_args.root={shapes_root}", *SIZES, "--trainer.enable_model_summary=false"],
        "report": str(root / "report"),
        "transfer": {"pairs": [["p_t/seed0", "p_t/seed1"], ["p_t/seed0", "ri_t/seed0"]], "lambdas": [0, 0.5, 1],
                     "criticality": ["p_t/seed0"], "alphas": [0, 0.5, 1], "sigmas": [0.05, 0.2], "draws": 2,
                     "images": 128, "bn_images": 128, "batch_size": 64,
                     "representations": [["p_t/seed0", "pretrain/seed0"], ["p_t/seed0", "p_t/seed1"], ["p_t/seed0", "ri_t/seed0"]]},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, shapes_root):
    """The transfer study's runs, trained in this process with the arguments the study gives them."""
    root = tmp_path_factory.mktemp("transfer")
    study = Study.load(transfer_study(root, shapes_root))
    states = run_states(study)
    for run in study.runs:  # as the study runs them: the grid first, then p_t refit at its best point
        cli.main(["fit", *with_chosen_point(study, run, states).config_args()])
    folders = {name: state.folder for name, state in states.items()}
    pretrained = folders["pretrain/seed0"] / "checkpoints" / "last.ckpt"
    return pretrained, {"p_t": folders["p_t/seed0"], "p_t_seed1": folders["p_t/seed1"], "ri_t": folders["ri_t/seed0"],
                        "pretrain": folders["pretrain/seed0"],
                        "study": study.path, "grid": {(i, s): folders[f"p_t_grid_lr{i}_wd0/seed{s}"] for i in (0, 1) for s in (0, 1)}}


def backbone(checkpoint: Path) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix("network.backbone."): v for k, v in state.items() if k.startswith("network.backbone.")}


def test_p_t_starts_from_the_pretrained_ema_with_a_new_head_and_ri_t_from_fresh_weights(fine_tuned):
    pretrained, folders = fine_tuned
    state = torch.load(pretrained, map_location="cpu", weights_only=False)["state_dict"]
    ema = {k.removeprefix("ema.module.backbone."): v for k, v in state.items() if k.startswith("ema.module.backbone.")}
    trained = {k.removeprefix("network.backbone."): v for k, v in state.items() if k.startswith("network.backbone.")}
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)  # the EMA is not the trained weights themselves
    start = backbone(folders["p_t"] / "checkpoints" / "epoch000.ckpt")
    for key, value in ema.items():
        torch.testing.assert_close(start[key], value, rtol=0, atol=0, msg=key)
    head = torch.load(folders["p_t"] / "checkpoints" / "epoch000.ckpt", weights_only=False)["state_dict"]["network.head.weight"]
    assert head.shape[0] == 10  # the sketch task's classes, not pre-training's 60
    random = backbone(folders["ri_t"] / "checkpoints" / "epoch000.ckpt")
    assert all(not torch.equal(random[k], ema[k]) for k in ema if k.endswith("conv1.weight"))
    for name in ("p_t", "p_t_seed1", "ri_t"):  # fine-tuning ran to its end
        assert (folders[name] / "checkpoints" / "finished.json").is_file()


def test_barriers_recompute_batch_norm_and_reproduce_their_ends(fine_tuned, shapes_root):
    _, folders = fine_tuned
    a, b = str(folders["p_t"]), str(folders["ri_t"])
    lambdas = [-2.0, 0.0, 0.25, 0.5, 0.75, 1.0, 3.0]
    found = barrier(a, b, lambdas, images=128, batch_size=64, bn_images=128)  # each checkpoint loaded once, one pass
    plain, recomputed = found["interpolated"], found["recomputed"]
    # lambda = 0 and 1 are the checkpoints themselves: their losses, evaluated directly.
    for end, index in ((a, 1), (b, -2)):
        assert plain["test"]["loss"][index] == pytest.approx(direct_loss(end), rel=1e-6)
    # Extrapolated moments are no network where a variance goes negative: no loss, no error (not class 0's).
    ends = [load_network("x", run).module.eval_network.state_dict() for run in (a, b)]
    undefined = [lam for lam in lambdas if negative_variance(interpolate(*ends, lam))]
    assert undefined and plain["test"]["undefined_lambdas"] == undefined and recomputed["test"]["undefined_lambdas"] == []
    for split, kind in itertools.product(("train", "test"), (plain, recomputed)):
        for lam, loss, error in zip(lambdas, kind[split]["loss"], kind[split]["error"]):
            assert np.isnan([loss, error]).all() == (kind is plain and lam in undefined), (split, lam)
    assert "the path has no network at" in "\n".join(barrier_lines([found]))
    # Interpolated running moments fit neither network at the midpoint: the barrier comes out higher.
    assert plain["test"]["loss_barrier"] > recomputed["test"]["loss_barrier"]
    itself = barrier(a, a, lambdas, images=128, batch_size=64, bn_images=128)["recomputed"]
    assert found["distance"] == distance(a, b)
    assert itself["train"]["loss_barrier"] == pytest.approx(0.0, abs=1e-6) and itself["test"]["error_barrier"] == pytest.approx(0.0, abs=1e-9)
    d = distance(a, str(folders["p_t_seed1"]))
    assert distance(a, a)["all"] == 0.0 and d["all"] > 0
    assert d["all"] == pytest.approx(np.sqrt(sum(v**2 for k, v in d.items() if k != "all")))


def direct_loss(run: str) -> float:
    """The softmax cross-entropy of a run's checkpoint on the first 128 test images, evaluated as validation would."""
    loaded = load_network("x", run)
    data = data_module_of(Path(run))
    data.setup("validate")
    total = 0.0
    with torch.no_grad():
        for batch in data.evaluation_dataloader("val", np.arange(128), local=True, batch_size=64):
            images, labels = data.on_after_batch_transfer(batch, 0)
            total += float(torch.nn.functional.cross_entropy(loaded.module(images), labels, reduction="sum"))
    return total / 128


def test_criticality_of_a_fine_tuned_network_against_its_start(fine_tuned):
    _, folders = fine_tuned
    run = folders["p_t"]
    result = criticality(str(run), str(run / "checkpoints" / "epoch000.ckpt"), alphas=[0.0, 0.5, 1.0], sigmas=[0.05, 0.2],
                         draws=2, images=128, batch_size=64)
    modules = result["modules"]
    network = load_network("x", str(run)).module.eval_network
    assert list(modules) == list(network.layers())  # each convolution (with its batch norm) and the head
    assert result["admissible"] == "error" and result["modules_by"] == "layers"
    for part in modules.values():
        assert part["criticality"] is None or part["criticality"] >= 0
        assert np.array(part["error_draws"]).shape == (3, 2, 2)
    assert 0 <= result["final_train_error"] <= 1
    assert result["bound"] == pytest.approx(result["final_train_error"] + 0.01)
    # A network perturbed from block k on runs from what enters block k: the numbers of the whole network's run.
    assert Logits(load_network("x", str(run))).chained(torch.randn(8, 3, 32, 32))
    assert criticality(str(run), str(run / "checkpoints" / "epoch000.ckpt"), alphas=[0.0, 0.5, 1.0], sigmas=[0.05, 0.2],
                       draws=2, images=128, batch_size=64, cache=False) == result
    blocks = criticality(str(run), str(run / "checkpoints" / "epoch000.ckpt"), alphas=[1.0], sigmas=[0.05], draws=1,
                         modules="blocks", images=128, batch_size=64)
    assert list(blocks["modules"]) == ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "head"]


def test_a_pretraining_checkpoint_of_another_architecture_is_refused_naming_both(fine_tuned):
    pretrained, _ = fine_tuned
    module = ObjectiveClassifier(num_classes=6, global_batch_size=32, backbone="resnet10t", backbone_source="timm",
                                 init_from=str(pretrained), measure="top1")
    with pytest.raises(PretrainingError, match=r"holds a test_resnet from timm, this run builds a resnet10t from timm"):
        module.setup("fit")
    with pytest.raises(PretrainingError, match="no checkpoint"):
        ObjectiveClassifier(num_classes=6, init_from="runs/none/last.ckpt")


def test_a_validation_split_holds_out_training_images_and_leaves_the_test_set_alone(shapes_root):
    data = EmbeddedShapesDataModule(root=str(shapes_root), num_train=1024, num_val=256, num_transfer_train=128,
                                    num_transfer_test=128, task="texture", validation_split=0.25, num_workers=1)
    every = data.source_labels("train")
    kept, held = data.resolve("train")[1], data.resolve("val")[1]
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == len(every) == 128
    assert data.labels("val").tolist() == every[held].tolist()
    assert np.bincount(data.labels("val"), minlength=6).min() >= 1  # every class is validated
    data.setup("validate")
    data.batch_size_per_process = 16
    val = torch.cat([data.on_after_batch_transfer(b, 0)[0] for b in data.val_dataloader()])
    plain = EmbeddedShapesDataModule(root=str(shapes_root), num_train=1024, num_val=256, num_transfer_train=128,
                                     num_transfer_test=128, task="texture", num_workers=1)
    plain.setup("validate")
    plain.batch_size_per_process = 16
    direct = torch.cat([plain.on_after_batch_transfer(b, 0)[0] for b in plain.evaluation_dataloader("train", held)])
    torch.testing.assert_close(val, direct, rtol=0, atol=0)  # the held-out training images, not texture_test


def test_the_grid_validates_on_held_out_training_images_and_the_refit_takes_its_best_point(fine_tuned):
    _, folders = fine_tuned
    study = Study.load(folders["study"])
    scores = grid_scores(study, "p_t", run_states(study))
    assert [p.lr_per_256 for p in scores.points] == [0.02, 0.2] and all(p.lr_times_weight_decay == 0 for p in scores.points)
    for i, point in enumerate(scores.points):  # A.3: each point's held-out accuracy averaged over the seeds
        last = {s: scalars(folders["grid"][i, s])["val/acc1"][-1][1] for s in (0, 1)}
        assert point.per_seed == pytest.approx(last, abs=1e-6)
        assert point.held_out_accuracy == pytest.approx((last[0] + last[1]) / 2, abs=1e-6)
    best = max(scores.points, key=lambda p: p.held_out_accuracy)
    assert scores.chosen == best.point
    for folder in folders["grid"].values():  # the grid's runs validate on a quarter of the training images, never the test set
        data = yaml.safe_load((folder / "config.yaml").read_text())["data"]["init_args"]
        assert data["validation_split"] == 0.25
    refit = yaml.safe_load((folders["p_t"] / "config.yaml").read_text())
    assert refit["data"]["init_args"].get("validation_split") is None  # refit on all of them, tested on the test set
    assert refit["model"]["lr_per_256"] == best.lr_per_256


def test_the_study_analyses_its_fine_tuning_and_reports_it(fine_tuned):
    _, folders = fine_tuned
    analyse(str(folders["study"]), accelerator="cpu", devices="1")
    report = Path(yaml.safe_load(folders["study"].read_text())["report"])
    text = (report / "report.md").read_text()
    assert "### Fine-tuning: P-T" in text
    # Each arm says where its hyper-parameters came from: p_t's grid chose lr_per_256 0.02 or 0.2; ri_t's are fixed.
    assert re.search(r"\| p_t \| sketch \| P-T \| 1 \| none \| lr/256 (0\.02|0\.2), lr×wd 0 \(grid\) \| 2 \|", text), text
    assert "| ri_t | sketch | RI-T | – | none | lr/256 0.1, wd 0.0001 (fixed) | 1 |" in text
    assert "On sketch, P-T trains" in text
    assert "p_t/seed0 – p_t/seed1" in text and "### Module criticality" in text and "Which of the talk's findings" in text
    for figure in ("learning_curves", "barriers", "criticality"):
        assert (report / f"figure_transfer_{figure}.png").stat().st_size > 10_000, figure
    found = json.loads((report / "transfer.json").read_text())
    # the grid's 2 points x 2 seeds, p_t's 2 seeds, ri_t: validated at steps 4 and 8. The pre-training run, on the
    # cosine schedule as RI-T, is told apart by being the run P-T starts from.
    assert [len(r["curve"]["accuracy"]) for r in found["runs"] if r["kind"] != "pre-training"] == [2] * 7
    assert "Hyper-parameters of p_t (appendix A.3)" in text and "held out, the mean over 2 seeds" in text and text.count("**") >= 2
    # Fine-tuning runs measure nothing at the end of fit: reported above, not listed as missing from Tables 1 and 3,
    # which show the pre-training run's probes; no R² was measured, so no Table 3, and no ρ of one point.
    assert "Missing runs" not in text and "| pretrain (Softmax) | 1 |" in text
    assert "## Table 3" not in text and "Spearman" not in text
    # Which checkpoint transfers best: the pre-training run probed its initial weights and its one epoch.
    assert [row["epoch"] for row in found["checkpoint_probes"]["pretrain/seed0"]] == [0, 1]
    assert "### Which pre-training checkpoint transfers best" in text and "pretrain/seed0: texture linear probe" in text
    assert (report / "figure_transfer_checkpoint_epoch.png").stat().st_size > 10_000
    # The talk's tables: CKA by stage and distance for every pair, errors for those with the target's head.
    rows = found["representations"]["pairs"]
    assert [(r["a"], r["b"]) for r in rows] == [("p_t/seed0", "pretrain/seed0"), ("p_t/seed0", "p_t/seed1"), ("p_t/seed0", "ri_t/seed0")]
    assert found["representations"]["layers"] == ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "penultimate"]
    assert rows[0]["errors"] is None and rows[0]["left_out"] == ["head.weight", "head.bias"] and rows[1]["left_out"] == []
    assert found["representations"]["images"]["val"]["images"] == 128
    assert "| p_t/seed0 – pretrain/seed0 | P-T & P |" in text and "| stem | layer1.0 |" in text
    assert "| all | stem | layer1.0 |" in text and "| head.weight, head.bias |" in text
    assert "| p_t/seed0 – ri_t/seed0 | P-T & RI-T |" in text and "a alone (%)" in text


def test_the_initial_weights_are_probed_as_their_kept_checkpoint_is(fine_tuned, tmp_path):
    """``at_start``: the probes at step 0 are those of ``epoch000.ckpt``, measured again from the file."""
    pretrained, _ = fine_tuned
    run = pretrained.parent.parent
    at_start = json.loads((run / "measurements.json").read_text())["evaluations"][0]
    assert at_start["step"] == 0
    cli.main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "epoch000.ckpt"),
              f"--trainer.logger.init_args.save_dir={tmp_path}"])
    again = json.loads((tmp_path / "softmax" / "seed0" / "measurements.json").read_text())["evaluations"][0]
    assert again["step"] == 0
    for tag in ("probe/texture/linear_acc", "probe/texture/knn_acc"):
        assert again["measurements"][tag] == at_start["measurements"][tag], tag


def test_a_target_is_scored_in_its_measure_and_one_without_a_measure_is_refused(tmp_path, shapes_root):
    """Fine-tuning validates in the target's measure as its sidecar records it (mean per class: Pets, Flowers),
    checked against scikit-learn on the trained network's own predictions; a target whose files record no measure
    stops the run at its start, saying how to name one."""
    import shutil

    from sklearn.metrics import balanced_accuracy_score

    def target(folder: Path, measure) -> Path:
        folder.mkdir()
        for split in ("texture_train", "texture_test"):
            shutil.copy(shapes_root / f"{split}.beton", folder / f"{split}.beton")
            if measure:
                info = json.loads((shapes_root / f"{split}.beton.json").read_text())
                (folder / f"{split}.beton.json").write_text(json.dumps({**info, "measure": measure}))
        config = folder / "data.yaml"
        config.write_text(yaml.safe_dump({"class_path": "datamodules.FFCVImageDataModule", "init_args": {
            "train_path": str(folder / "texture_train.beton"), "val_path": str(folder / "texture_test.beton"),
            "image_size": 32, "val_resize": 32, "global_batch_size": 32, "num_workers": 1}}))
        return config

    def fit(data: Path):
        return cli.main(["fit", "--config", str(REPO / "configs" / "transfer" / "finetune.yaml"), f"--data={data}",
                         "--model.init_from=null", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
                         "--checkpoints.epochs=[]", f"--trainer.default_root_dir={data.parent / 'runs'}"])

    built = fit(target(tmp_path / "pets", "mean_per_class"))
    logged = float(built.trainer.callback_metrics["val/acc_mean_per_class"])
    module, data = built.model.eval(), built.datamodule
    predictions, labels = [], []
    with torch.no_grad():
        for batch in data.evaluation_dataloader("val", local=True):
            images, y = data.on_after_batch_transfer(batch, 0)
            predictions.append(module(images).argmax(1))
            labels.append(y)
    expected = balanced_accuracy_score(torch.cat(labels).numpy(), torch.cat(predictions).numpy())
    assert logged == pytest.approx(expected, abs=1e-6)
    assert logged != pytest.approx(float(built.trainer.callback_metrics["val/acc1"]), abs=1e-4)  # the measures differ here
    with pytest.raises(PretrainingError, match=r"No accuracy measure is known for the fine-tuning target .*texture_test\.beton.*"
                                               r"--data\.init_args\.measure=top1"):
        fit(target(tmp_path / "unknown", None))


def by_hand(network, backbone_input):
    """The stem's output, each block's and the pooled penultimate features of a timm ResNet, run by hand."""
    backbone = network.backbone
    x = backbone.maxpool(backbone.act1(backbone.bn1(backbone.conv1(backbone_input))))
    out = {"stem": x.clone()}
    for name, block in network.blocks().items():
        x = block(x)
        out[name] = x.clone()
    out["penultimate"] = backbone.forward_head(x)
    return out


def test_representations_match_cka_distance_and_errors_computed_by_hand(fine_tuned):
    """The talk's tables for P-T & P (heads of 6 and 60 classes) and RI-T & P-T (a the second of compare()'s order):
    per-stage CKA as measurements.cka's sums of unbiased HSIC over the same batches of the same test images, the
    distance over the shared parameters, and who is right from the networks' own predictions."""
    _, folders = fine_tuned
    named = {"p_t/seed0": folders["p_t"], "pretrain/seed0": folders["pretrain"], "ri_t/seed0": folders["ri_t"]}
    found = representations([("p_t/seed0", "pretrain/seed0"), ("ri_t/seed0", "p_t/seed0")], named, images=96, batch_size=48)
    pt_p, rit_pt = found["pairs"]
    networks = {n: load_network(n, str(f)).module for n, f in named.items()}
    data = data_module_of(folders["p_t"])  # the target's: the first pair's first run
    data.setup("validate")
    order = pass_images(data.labels("val"), 96, 0)[0]
    hsic = {k: np.zeros(6) for k in ("ab", "aa", "bb")}
    predictions, labels = {n: [] for n in networks}, []
    with torch.no_grad():
        for start in (0, 48):
            [batch] = list(data.evaluation_dataloader("val", order[start:start + 48], local=True, batch_size=48))
            images, y = data.on_after_batch_transfer(batch, 0)
            a, b = (by_hand(networks[n].eval_network, images) for n in ("p_t/seed0", "pretrain/seed0"))
            for i, layer in enumerate(found["layers"]):
                K, L = gram(a[layer]), gram(b[layer])
                hsic["ab"][i] += float(unbiased_hsic(K, L))
                hsic["aa"][i] += float(unbiased_hsic(K, K))
                hsic["bb"][i] += float(unbiased_hsic(L, L))
            for n, module in networks.items():
                predictions[n].append(module(images).argmax(1))
            labels.append(y)
    assert found["layers"] == ["stem", *networks["p_t/seed0"].eval_network.blocks(), "penultimate"]
    expected = hsic["ab"] / np.sqrt(hsic["aa"] * hsic["bb"])
    np.testing.assert_allclose([pt_p["cka"][layer] for layer in found["layers"]], expected, rtol=0, atol=1e-6)
    assert expected[0] > 0.5 and expected[0] != pytest.approx(expected[-1], abs=1e-3)  # a real, layer-dependent number

    # Distance: the 10-class and the 60-class heads differ in shape, so only what both have counts.
    theta = {n: dict(networks[n].eval_network.named_parameters()) for n in ("p_t/seed0", "pretrain/seed0")}
    shared = [k for k, v in theta["p_t/seed0"].items() if v.shape == theta["pretrain/seed0"][k].shape]
    assert set(theta["p_t/seed0"]) - set(shared) == {"head.weight", "head.bias"}
    squares = {k: float((theta["p_t/seed0"][k].double() - theta["pretrain/seed0"][k].double()).pow(2).sum()) for k in shared}
    assert pt_p["distance"]["all"] == pytest.approx(np.sqrt(sum(squares.values())), rel=1e-12)
    blocks = list(networks["p_t/seed0"].eval_network.blocks())
    for module, value in pt_p["distance"].items():
        if module == "all":
            continue
        names = ([k for k in shared if k.startswith(f"backbone.{module}.")] if module in blocks else
                 [k for k in shared if not any(k.startswith(f"backbone.{b}.") for b in blocks)])
        assert value == pytest.approx(np.sqrt(sum(squares[k] for k in names)), rel=1e-12), module
    assert "head" not in pt_p["distance"] and pt_p["left_out"] == ["head.weight", "head.bias"] and pt_p["errors"] is None
    assert shared_distance(str(folders["p_t"]), str(folders["pretrain"])) == {k: pt_p[k] for k in ("distance", "left_out")}

    # Errors of RI-T (a) and P-T (b), from their predictions on the same images.
    y = torch.cat(labels).numpy()
    right_a, right_b = (torch.cat(predictions[n]).numpy() == y for n in ("ri_t/seed0", "p_t/seed0"))
    e = rit_pt["errors"]
    split = {"both_right": right_a & right_b, "a_right_alone": right_a & ~right_b, "b_right_alone": ~right_a & right_b,
             "both_wrong": ~right_a & ~right_b}
    for key, hits in split.items():
        assert e[key] == pytest.approx(hits.mean(), abs=1e-12), key
    assert sum(e[key] for key in split) == pytest.approx(1.0, abs=1e-12)
    assert e["agreement"] == pytest.approx(np.mean(torch.cat(predictions["ri_t/seed0"]).numpy()
                                                   == torch.cat(predictions["p_t/seed0"]).numpy()), abs=1e-12)
    assert (e["a"], e["b"]) == ("ri_t/seed0", "p_t/seed0")
    assert found["images"]["val"] == {**found["images"]["val"], "images": 96, "classes": 10}  # the sketch task's


def test_cka_between_heads_needs_one_backbone_and_predictions_one_head(fine_tuned):
    _, folders = fine_tuned
    p_t, p = load_network("p_t/seed0", str(folders["p_t"])), load_network("pretrain/seed0", str(folders["pretrain"]))
    check_comparable([p_t, p], classes=False)  # 6 and 60 classes, one backbone: CKA and shared distance
    with pytest.raises(ComparisonError, match=r"p_t/seed0 .*10 classes\) and pretrain/seed0 .*60 classes\) differ in "
                                              r"architecture or classes"):
        check_comparable([p_t, p])
    other = Loaded("other", ObjectiveClassifier(num_classes=6, backbone="resnet10t", backbone_source="timm"), Path("x.ckpt"), False)
    with pytest.raises(ComparisonError, match=r"p_t/seed0 .*test_resnet.* and other .*resnet10t.* differ in backbone"):
        check_comparable([p_t, other], classes=False)


def test_representation_pairs_are_checked_when_the_study_loads(tmp_path):
    path = transfer_study(tmp_path, tmp_path / "shapes")
    spec = yaml.safe_load(path.read_text())
    assert Study.load(path).transfer.representations[0] == ("p_t/seed0", "pretrain/seed0")
    for pairs, message in (([["p_t/seed0", "ri_t/seed7"]], r"'ri_t/seed7' is not one of the study's runs"),
                           ([["p_t/seed0"]], r"a representations pair names two runs"),
                           ([["p_t/seed0", "ri_t/seed0@untrained"]], r"compare trained runs")):
        spec["transfer"]["representations"] = pairs
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(StudyError, match=message):
            Study.load(path)
