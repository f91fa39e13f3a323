"""Which samples and how many CPUs each process gets: one rule for the FFCV and the torchvision paths.

Training shards are disjoint and of equal size, so every rank takes the same number of optimiser steps;
the epoch's order is a function of (seed, epoch) only, so a resumed run sees the same order as an
uninterrupted one. Evaluation shards cover every sample exactly once, without the padding that torch's
DistributedSampler adds (a padded duplicate would count twice in val/acc1).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["epoch_shard", "cpus_per_process"]


def epoch_shard(num_samples: int, rank: int, world_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """Indices that process ``rank`` of ``world_size`` reads in epoch ``epoch``.

    shuffle=True (training): one permutation of all samples, seeded by (seed, epoch), is cut to a multiple
    of ``world_size`` and dealt round-robin; the ``num_samples % world_size`` samples at its tail (different
    ones every epoch) wait for the next epoch, as with ``drop_last``.
    shuffle=False (evaluation): sample i goes to rank ``i % world_size``; shards differ in length by at
    most one and together hold every sample exactly once.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}.")
    if not shuffle:
        return np.arange(rank, num_samples, world_size, dtype=np.int64)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    return order[: num_samples - num_samples % world_size][rank::world_size]


def cpus_per_process(processes_per_node: int = 1) -> int:
    """CPUs this process may use for data loading: SLURM's ``--cpus-per-task`` when under SLURM (already
    per process), else the CPUs in this process's affinity mask shared among the node's processes."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm:
        return max(1, int(slurm))
    return max(1, len(os.sched_getaffinity(0)) // max(1, processes_per_node))
