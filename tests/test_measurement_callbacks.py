"""The measurement callbacks in a real fit: every tag in TensorBoard, figures, the JSON summary, and the
logged numbers equal the pure functions applied to the EMA network's features computed here."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import TransferData, TransferProbes
from callbacks.representation import balanced_subset
from datamodules import EmbeddedShapesDataModule
from measurements import class_separation, knn_probe, linear_probe, relu_nonzero_fraction

from .helpers import ffcv_datamodule, scalars, write_indexed_beton
from .test_training import fit


def ema_features(model, data, source, subset=None, precision=torch.float32):
    """The EMA network's penultimate features of ``source`` (under bf16 autocast when asked), with labels."""
    xs, ys = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
        for images, labels in data.evaluation_dataloader(source, subset):
            images, labels = data.on_after_batch_transfer((images, labels), 0)
            xs.append(model.ema.module.eval()(images))
            ys.append(labels.clone())
    assert xs[0].dtype == precision
    return torch.cat(xs), torch.cat(ys)


def ema_block_output(model, data, subset, block):
    """One block's output of the EMA network on the images ``subset`` of train."""
    outputs = []
    handle = model.ema.module.blocks()[block].register_forward_hook(lambda m, i, out: outputs.append(out.clone()))
    try:
        ema_features(model, data, "train", subset)
    finally:
        handle.remove()
    return torch.cat(outputs)


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory, shapes_root):
    tmp = tmp_path_factory.mktemp("measured")
    # The quickstart's own callbacks; with one epoch, each measures once, at the end of fit.
    run = fit(tmp, shapes_root, "--trainer.limit_train_batches=3")
    events = EventAccumulator(run.trainer.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return run, events


def test_every_measurement_is_logged_under_its_tag(measured_run):
    run, events = measured_run
    scalars = set(events.Tags()["scalars"])
    layers = [*run.model.eval_network.blocks(), "penultimate"]
    expected = {f"class_separation/{split}/{layer}" for split in ("train", "val") for layer in layers}
    expected |= {f"relu_nonzero/{layer}" for layer in layers}
    expected |= {f"neural_collapse/{k}" for k in ("within_over_between", "self_duality", "cos_mean_shift_avg",
                                                   "std_over_avg_mean_norm", "std_over_avg_weight_norm")}
    expected |= {f"calibration/val_split/{k}" for k in ("nll", "ece", "nll_tempscaled", "ece_tempscaled", "temperature")}
    expected |= {f"probe/texture/{k}" for k in ("linear_acc", "knn_acc", "linear_l2", "knn_k")}
    assert expected <= scalars, sorted(expected - scalars)
    assert {"class_separation/by_layer", "relu_nonzero/by_layer"} <= set(events.Tags()["images"])
    assert len(events.Scalars("class_separation/val/penultimate")) == 1


def test_logged_numbers_are_those_of_the_ema_network(measured_run):
    run, events = measured_run
    model, data = run.model, run.datamodule
    assert model.ema is not None

    def last(tag):
        return events.Scalars(tag)[-1].value

    train_x, train_y = ema_features(model, data, "train")  # penultimate R²: every training image
    assert len(train_y) == 1024
    assert last("class_separation/train/penultimate") == pytest.approx(class_separation(train_x, train_y), abs=1e-5)
    subset = balanced_subset(data.labels("train"), 1000, seed=0)  # blocks: the quickstart's train_images
    block = ema_block_output(model, data, subset, "layer2.0")
    assert last("class_separation/train/layer2.0") == pytest.approx(class_separation(block, train_y[subset]), abs=1e-5)
    val_x, val_y = ema_features(model, data, "val")
    assert last("class_separation/val/penultimate") == pytest.approx(class_separation(val_x, val_y), abs=1e-5)
    assert last("relu_nonzero/penultimate") == pytest.approx(relu_nonzero_fraction(val_x), abs=1e-6)
    assert 0 <= last("calibration/val_split/ece") <= 1 and last("calibration/val_split/nll") > 0
    assert 0 <= last("probe/texture/linear_acc") <= 1 and last("probe/texture/knn_k") >= 1


def test_summary_json_holds_every_evaluation_with_objective_and_config(measured_run):
    run, events = measured_run
    summary = json.loads((Path(run.trainer.log_dir) / "measurements.json").read_text())
    assert summary["objective"]["class_path"].endswith("Softmax")
    assert "lr_per_256" in summary["hparams"] and "seed_everything" in summary["config"]
    (evaluation,) = summary["evaluations"]
    assert evaluation["step"] == run.trainer.global_step
    logged = {tag for tag in events.Tags()["scalars"] if tag.split("/")[0] in
              ("class_separation", "relu_nonzero", "neural_collapse", "calibration", "probe")}
    # Validation's numbers of the same step ride along, so a study reads top-1 beside the measurements.
    validation = {tag: events.Scalars(tag)[-1].value for tag in ("val/acc1", "val/acc5", "val/loss")}
    assert set(evaluation["measurements"]) == logged | set(validation)
    for tag, value in validation.items():
        assert evaluation["measurements"][tag] == pytest.approx(value, rel=1e-6)


def test_transfer_probes_without_data_sets_say_how_to_name_them(tmp_path):
    data = ffcv_datamodule(write_indexed_beton(tmp_path / "d.beton", 8))
    with pytest.raises(ValueError, match="comes with none, so name them"):
        TransferProbes().measure(SimpleNamespace(datamodule=data), None)


def test_transfer_probes_can_probe_some_of_the_data_modules_tasks(shapes_root):
    data = SimpleNamespace(datamodule=EmbeddedShapesDataModule(str(shapes_root), task="sketch"))
    assert set(TransferProbes()._datasets(data)) == {"texture", "size", "new_shapes"}  # every task but its own
    chosen = TransferProbes(tasks=["size", "texture"])._datasets(data)
    assert {n: (d.train, d.test) for n, d in chosen.items()} == {
        n: paths for n, paths in data.datamodule.transfer_paths().items() if n in ("size", "texture")}
    with pytest.raises(ValueError, match=r"no task \['sketch'\] .* whose tasks are \['new_shapes', 'size', 'texture'\]"):
        TransferProbes(tasks=["sketch", "size"])._datasets(data)
    with pytest.raises(ValueError, match="without datasets, and at least one"):
        TransferProbes(tasks=[])


def test_a_missing_transfer_file_stops_the_run_at_its_start(tmp_path):
    from datamodules import BetonError

    data = ffcv_datamodule(write_indexed_beton(tmp_path / "d.beton", 8))
    probes = TransferProbes({"cifar10": {"train": str(tmp_path / "cifar10_train.beton"), "test": str(tmp_path / "d.beton")}})
    with pytest.raises(BetonError, match="cifar10_train.beton"):
        probes.on_fit_start(SimpleNamespace(datamodule=data), None)


def test_the_printed_summary_keeps_the_headline_numbers(tmp_path):
    from callbacks.measurement import final_summary

    trainer = SimpleNamespace(global_step=40, logger=SimpleNamespace(log_dir=str(tmp_path)), default_root_dir=str(tmp_path))
    text = final_summary("RepresentationMeasurements", trainer, {
        "class_separation/val/penultimate": 0.41, "class_separation/val/layer1.0": 0.05,
        "relu_nonzero/penultimate": 0.6, "probe/texture/linear_acc": 0.83})
    assert "class_separation/val/penultimate" in text and "probe/texture/linear_acc" in text and "0.83" in text
    assert "layer1.0" not in text and str(tmp_path / "measurements.json") in text


def test_under_bf16_autocast_the_probes_see_bf16_features_and_compute_in_float32(tmp_path):
    # The GPU default (bf16-mixed), on the CPU: the forward passes run under autocast, the probes outside it
    # (inside, the linear probe's float32 products became bf16 and failed; the kNN similarities would be bf16).
    sizes = ["--data.init_args.num_train=512", "--data.init_args.num_val=64"]
    run = fit(tmp_path, tmp_path / "shapes", "--trainer.precision=bf16-mixed", "--trainer.limit_train_batches=2",
              "--trainer.limit_val_batches=1", *sizes)
    model, data = run.model, run.datamodule
    spec = TransferData(*data.transfer_paths()["texture"])

    train_x, train_y = ema_features(model, data, spec.train, precision=torch.bfloat16)
    test_x, test_y = ema_features(model, data, spec.test, precision=torch.bfloat16)
    train_x, test_x = train_x.float(), test_x.float()
    logged = {tag: values[-1][1] for tag, values in scalars(run.trainer.log_dir).items()}
    linear = linear_probe(train_x, train_y, test_x, test_y, measure=spec.score_measure())
    knn = knn_probe(train_x, train_y, test_x, test_y, measure=spec.score_measure())
    assert logged["probe/texture/linear_acc"] == pytest.approx(linear.accuracy, abs=1e-6)
    assert logged["probe/texture/linear_l2"] == pytest.approx(linear.l2)
    assert logged["probe/texture/knn_acc"] == pytest.approx(knn.accuracy, abs=1e-6)
    assert logged["probe/texture/knn_k"] == knn.k


def test_a_failing_measurement_is_recorded_and_the_run_goes_on(tmp_path, shapes_root, monkeypatch):
    import callbacks.representation as representation

    real = representation.forward_pass
    # The representation pass sees diverged features; the probes (their own forward pass) do not.
    monkeypatch.setattr(representation, "forward_pass", lambda *args: real(*args) * float("inf"))
    run = fit(tmp_path, shapes_root, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
              "--checkpoints.epochs=[2]", epochs=2)
    assert run.trainer.current_epoch == 2  # both epochs trained
    folder = Path(run.trainer.log_dir)
    assert {p.name for p in (folder / "checkpoints").iterdir()} == {"last.ckpt", "epoch002.ckpt", "finished.json"}
    (evaluation,) = json.loads((folder / "measurements.json").read_text())["evaluations"]
    error = evaluation["errors"]["RepresentationMeasurements"]
    assert error.startswith("DivergedWeights") and "weights have diverged" in error and "model.lr_per_256" in error
    assert "linalg" not in error
    assert "probe/texture/linear_acc" in evaluation["measurements"]  # the other measurement went on


def test_measurements_of_another_config_are_set_aside_not_merged(tmp_path):
    from callbacks.measurement import record
    from callbacks.run_config import fingerprint

    def recorded(lr, step):
        (tmp_path / "config.yaml").write_text(f"model:\n  lr_per_256: {lr}\n")
        trainer = SimpleNamespace(loggers=[], logger=SimpleNamespace(log_dir=str(tmp_path)))
        record(trainer, SimpleNamespace(hparams={"lr_per_256": lr}), 0, step, {"acc": lr}, {})
        return json.loads((tmp_path / "measurements.json").read_text())

    recorded(0.1, 10)
    first = recorded(0.1, 20)
    assert [e["step"] for e in first["evaluations"]] == [10, 20]
    assert first["fingerprint"] == fingerprint({"model": {"lr_per_256": 0.1}}) == first["evaluations"][0]["fingerprint"]
    second = recorded(0.2, 10)  # another config in the same folder: its own file, the first one kept beside it
    assert [e["measurements"]["acc"] for e in second["evaluations"]] == [0.2]
    kept = json.loads((tmp_path / f"measurements.{first['fingerprint']}.json").read_text())
    assert kept["evaluations"] == first["evaluations"]


def test_probe_features_keep_the_whole_image_as_appendix_a2(tmp_path):
    from lightning.pytorch.plugins.precision import Precision

    from datamodules.shapes import render_shapes

    beton = write_indexed_beton(tmp_path / "d.beton", 8)  # 32 px images
    stored, _ = render_shapes(8, np.random.default_rng(0), 32)  # what write_indexed_beton wrote
    data = ffcv_datamodule(beton, val_resize=40)  # validation: the central 80 %, resized to 32
    data.setup("fit")
    trainer = SimpleNamespace(datamodule=data, precision_plugin=Precision(), world_size=1)
    module = SimpleNamespace(eval_network=torch.nn.Flatten(), device=torch.device("cpu"), trainer=trainer,
                             transfer_batch_to_device=lambda batch, device, index: batch)
    expected = data.on_after_batch_transfer((torch.from_numpy(stored).permute(0, 3, 1, 2).contiguous(), torch.zeros(8)), 0)[0]
    features, _ = TransferProbes().features(trainer, module, str(beton))
    torch.testing.assert_close(features, expected.flatten(1), rtol=0, atol=1e-5)  # every pixel, none resampled
    cropped, _ = TransferProbes(crop_ratio=0.8).features(trainer, module, str(beton))
    assert (cropped - expected.flatten(1)).abs().mean() > 0.1
    with pytest.raises(ValueError, match="crop_ratio must be in"):
        TransferProbes(crop_ratio=1.2)
    with pytest.raises(ValueError, match="linear_max_iter must be >= 1"):
        TransferProbes(linear_max_iter=0)


def test_a_transfer_set_without_a_known_measure_is_refused(tmp_path):
    beton = write_indexed_beton(tmp_path / "pets_train.beton", 8)
    Path(f"{beton}.json").unlink()  # e.g. converted by other tools
    with pytest.raises(ValueError, match=r"No accuracy measure .* measure: mean_per_class \(Pets"):
        TransferData(str(beton), str(beton)).score_measure()
    assert TransferData(str(beton), str(beton), measure="mean_per_class").score_measure() == "mean_per_class"
    with pytest.raises(ValueError, match="unknown measure 'top5'"):
        TransferData(str(beton), str(beton), measure="top5").score_measure()


def test_calibration_fits_its_temperature_on_the_holdout_and_reports_every_validation_image(tmp_path, shapes_root):
    from measurements.calibration import fit_temperature, negative_log_likelihood

    holdout = shapes_root / "train.beton"  # stands in for held-out images of the same classes
    run = fit(tmp_path, shapes_root, f"--data.init_args.holdout_path={holdout}", "--trainer.limit_train_batches=2",
              "--trainer.limit_val_batches=0")
    measured = json.loads((Path(run.trainer.log_dir) / "measurements.json").read_text())["evaluations"][-1]["measurements"]
    assert not [tag for tag in measured if tag.startswith("calibration/val_split")]

    def logits(source):
        x, y = ema_features(run.model, run.datamodule, source)
        return run.model.logits(x, run.model.ema.module), y

    (fit_z, fit_y), (val_z, val_y) = logits(str(holdout)), logits("val")
    temperature = fit_temperature(fit_z, fit_y)
    assert measured["calibration/holdout/temperature"] == pytest.approx(temperature, rel=1e-4)
    assert measured["calibration/holdout/nll_tempscaled"] == pytest.approx(negative_log_likelihood(val_z, val_y, temperature=temperature), rel=1e-4)
    assert measured["calibration/holdout/nll"] == pytest.approx(negative_log_likelihood(val_z, val_y), rel=1e-5)
