"""Checkpoints are replaced atomically: a write cut short leaves the previous one intact and loadable."""

import os

import pytest
import torch

import cli
from lightning_modules.atomic_checkpoint import AtomicCheckpointIO

from .test_training import REPO


def test_a_write_cut_short_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(1000.0)}, path)
    before = path.read_bytes()

    def dies_half_way(obj, f):  # as a SIGKILL or a full disk would, after some bytes are out
        f.write(b"\x80\x02 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert io.load_checkpoint(path)["step"] == 1
    assert os.listdir(path.parent) == ["last.ckpt"], "a partial file was left behind"


def test_the_new_checkpoint_takes_the_name_by_one_rename_in_the_same_folder(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((src, dst)), real_replace(src, dst)))
    io.save_checkpoint({"step": 3}, path)
    ((src, dst),) = renames
    assert os.path.dirname(src) == os.path.dirname(dst) == str(tmp_path)  # same file system: atomic
    assert io.load_checkpoint(path)["step"] == 3


def test_every_run_writes_checkpoints_atomically_and_its_saved_config_reloads(tmp_path):
    built = cli.main(["--config", str(REPO / "configs/imagenet/softmax.yaml")], run=False)
    assert isinstance(built.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    saved = tmp_path / "config.yaml"  # as SaveConfigCallback writes it beside every run
    built.parser.save(built.config, saved, skip_none=False, overwrite=True, multifile=False)
    again = cli.main(["--config", str(saved)], run=False)
    assert isinstance(again.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
