"""Which samples each process reads: disjoint, complete, reproducible by (seed, epoch), for both loaders."""

import numpy as np
import pytest

from datamodules import epoch_shard
from datamodules.distributed import cpus_per_process

from .helpers import StubTrainer, write_indexed_beton
from .helpers import ffcv_datamodule as datamodule


@pytest.mark.parametrize("n,world", [(64, 2), (67, 2), (67, 3), (10, 4), (5, 1)])
def test_training_shards_are_disjoint_equal_and_cover_all_but_the_remainder(n, world):
    for epoch in range(3):
        shards = [epoch_shard(n, r, world, shuffle=True, seed=7, epoch=epoch) for r in range(world)]
        assert len({len(s) for s in shards}) == 1, "ranks would take different numbers of steps"
        union = np.concatenate(shards)
        assert len(np.unique(union)) == len(union) == n - n % world
        assert set(union) <= set(range(n))


def test_training_order_is_a_function_of_seed_and_epoch():
    a = [epoch_shard(100, 1, 2, shuffle=True, seed=3, epoch=e) for e in range(3)]
    b = [epoch_shard(100, 1, 2, shuffle=True, seed=3, epoch=e) for e in range(3)]
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (a[0] == a[1]).all() and not (a[1] == a[2]).all(), "every epoch must reshuffle"
    assert not (a[0] == epoch_shard(100, 1, 2, shuffle=True, seed=4, epoch=0)).all()
    left_out = [set(range(101)) - set(np.concatenate([epoch_shard(101, r, 2, shuffle=True, epoch=e) for r in (0, 1)]))
                for e in range(4)]
    assert len(set().union(*left_out)) > 1, "the sample an epoch leaves out should change between epochs"


@pytest.mark.parametrize("n,world", [(37, 2), (37, 4), (3, 4), (8, 8)])
def test_evaluation_shards_hold_every_sample_exactly_once(n, world):
    union = np.concatenate([epoch_shard(n, r, world, shuffle=False) for r in range(world)])
    assert sorted(union.tolist()) == list(range(n))


def test_ffcv_loader_reads_this_ranks_shard_of_this_epoch(tmp_path):
    n = 42  # label == index, so the labels read are the samples read
    beton = write_indexed_beton(tmp_path / "d.beton", n)
    for rank, epoch in ((0, 0), (1, 0), (1, 3)):
        data = datamodule(beton, world_size=2, rank=rank)
        data.trainer.current_epoch = epoch
        data.setup("fit")
        # copies: FFCV reuses a batch's memory a few batches later
        train = np.concatenate([labels.numpy().copy().ravel() for _, labels in data.train_dataloader()])
        expected = epoch_shard(n, rank, 2, shuffle=True, seed=0, epoch=epoch)
        assert (train == expected[: len(train)]).all() and len(train) == 20  # 21 per rank, batches of 4, drop_last
        val = np.concatenate([labels.numpy().copy().ravel() for _, labels in data.val_dataloader()])
        assert val.tolist() == list(range(rank, n, 2))


def test_one_loader_follows_the_trainer_epoch_and_a_resumed_process_continues_it(tmp_path):
    beton = write_indexed_beton(tmp_path / "d.beton", 48)

    def epoch_labels(loader):
        return np.concatenate([labels.numpy().copy().ravel() for _, labels in loader]).tolist()

    running = datamodule(beton, world_size=2, rank=1)
    running.setup("fit")
    loader = running.train_dataloader()  # one loader for the whole fit, as Lightning keeps it
    orders = []
    for epoch in (0, 1):
        running.trainer.current_epoch = epoch
        orders.append(epoch_labels(loader))
    resumed = datamodule(beton, world_size=2, rank=1)  # a new process restored at epoch 1
    resumed.trainer.current_epoch = 1
    resumed.setup("fit")
    assert orders[0] != orders[1], "the order did not change with the epoch"
    assert epoch_labels(resumed.train_dataloader()) == orders[1], "a resumed run replayed another epoch's order"


def test_workers_default_to_this_process_share_of_the_cpus(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert cpus_per_process(4) == 6  # SLURM's figure is already per task
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert cpus_per_process(4) == 4 and cpus_per_process(1) == 16 and cpus_per_process(32) == 1
    assert StubTrainer().num_devices == 1
