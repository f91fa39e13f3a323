"""The GPU fast path run end to end on the CPU: bf16 autocast, channels_last weights and batches, torch.compile
(inductor's CPU backend), every measurement callback, a preemption and a resume. What needs a GPU (non-blocking
copies, FFCV's ToDevice, cuDNN's benchmark mode) follows the device alone (``ImageClassificationData.on_cuda``)."""

import json
import math
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.preemption import Preempted

from .helpers import SignalAt
from .test_preemption import default_handlers  # noqa: F401  (autouse: the process's signal handlers back after each test)
from .test_training import NO_MEASUREMENTS, assert_same_end, fit

FAST = ["--trainer.precision=bf16-mixed", "--data.init_args.channels_last=true", "--model.compile=true"]


class FastPathSeen(L.Callback):
    """What the run looked like from inside: the layout of its training batches and weights, whether the trained
    network was compiled, and the dtype of the evaluated network's features in validation and measurements."""

    def __init__(self):
        self.batch_layouts, self.weight_layouts, self.compiled, self.feature_dtypes = set(), set(), set(), set()

    def on_fit_start(self, trainer, pl_module):
        pl_module.eval_network.backbone.register_forward_hook(lambda m, i, out: self.feature_dtypes.add(out.dtype))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_layouts.add(batch[0].is_contiguous(memory_format=torch.channels_last))
        for net in (pl_module.network, pl_module.eval_network):
            convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
            self.weight_layouts.update(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        self.compiled.add(pl_module.network._compiled_call_impl is not None)


def measured(run) -> dict[str, float]:
    """The one evaluation a run's measurement callbacks wrote (at the end of fit)."""
    (evaluation,) = json.loads((Path(run.trainer.logger.log_dir) / "measurements.json").read_text())["evaluations"]
    return evaluation["measurements"]


def test_the_fast_path_trains_measures_and_resumes_on_the_cpu(tmp_path, shapes_root):
    seen = FastPathSeen()
    straight = fit(tmp_path / "straight", shapes_root, *FAST, epochs=1, run=False)  # 16 steps, then every measurement
    straight.trainer.callbacks.append(seen)
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    assert seen.batch_layouts == seen.weight_layouts == seen.compiled == {True}
    assert seen.feature_dtypes == {torch.bfloat16}, "validation and measurements ran outside autocast"

    # Preempted at step 10 (signalled at 3, acted on at the next check), then resumed: the straight run's end.
    preempted = fit(tmp_path / "preempted", shapes_root, *FAST, epochs=1, run=False)
    preempted.trainer.callbacks.append(SignalAt(3, signal.SIGUSR1))
    with pytest.raises(Preempted):
        preempted.trainer.fit(preempted.model, datamodule=preempted.datamodule)
    assert preempted.trainer.global_step == 10
    resumed = fit(tmp_path / "preempted", shapes_root, *FAST, "--ckpt_path=last", epochs=1)
    assert_same_end(straight, resumed, steps=16, epochs=1)

    ours, theirs = measured(straight), measured(resumed)
    assert len(ours) > 40 and all(math.isfinite(v) for v in ours.values()), ours
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert theirs[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name

    # The checkpoint a GPU run writes is the one a plain run writes: the same keys, loadable by either.
    plain = fit(tmp_path / "plain", shapes_root, NO_MEASUREMENTS, "--trainer.max_steps=2", "--trainer.limit_val_batches=0")
    fast_ckpt, plain_ckpt = (torch.load(next((tmp_path / d).rglob("last.ckpt")), weights_only=False) for d in ("straight", "plain"))
    assert fast_ckpt.keys() == plain_ckpt.keys()
    assert fast_ckpt["state_dict"].keys() == plain_ckpt["state_dict"].keys()
    assert plain.trainer.global_step == 2
