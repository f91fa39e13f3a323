"""Class separation R² (Eq. 11) against the paper's pairwise double sums, and its exactness under DDP."""

import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from measurements import ClassSeparation, class_separation


def pairwise_r2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Eq. 11 exactly as written: average cosine distances over all pairs, self-pairs included."""
    x = x.flatten(1).double()
    classes = sorted(set(y.tolist()))
    members = {k: [i for i in range(len(y)) if y[i] == k] for k in classes}
    K = len(classes)

    def cos(i, j):
        return float(x[i] @ x[j] / (x[i].norm() * x[j].norm()))

    d_within = sum((1 - cos(m, n)) / (K * len(members[k]) ** 2)
                   for k in classes for m in members[k] for n in members[k])
    d_total = sum((1 - cos(m, n)) / (K**2 * len(members[j]) * len(members[k]))
                  for j, k in itertools.product(classes, classes) for m in members[j] for n in members[k])
    return 1 - d_within / d_total


def clustered(n_per_class, dim=6, spread=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(n_per_class), dim, generator=g)
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(n_per_class)])
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


@pytest.mark.parametrize("sizes", [[5, 5, 5], [2, 9, 4, 1], [30, 3]])
def test_closed_form_equals_the_pairwise_double_sum(sizes):
    x, y = clustered(sizes)
    assert class_separation(x, y) == pytest.approx(pairwise_r2(x, y), abs=1e-6)


def test_conv_maps_are_flattened_over_channels_and_space():
    x, y = clustered([4, 6, 3], dim=2 * 3 * 3)
    maps = x.view(-1, 2, 3, 3)
    assert class_separation(maps, y) == pytest.approx(pairwise_r2(x, y), abs=1e-6)


def test_separated_classes_approach_one_and_shuffled_labels_zero():
    x, y = clustered([50, 50, 50], spread=0.01)
    assert class_separation(x, y) > 0.99
    x, y = clustered([400, 400], spread=5.0)
    assert abs(class_separation(x, y[torch.randperm(len(y))])) < 0.02


def test_streaming_metric_read_class_by_class_equals_the_double_sum():
    x, y = clustered([7, 3, 11, 5])
    order = torch.argsort(y, stable=True)  # class by class, in batches that cut across classes
    metric = ClassSeparation(dim=x.shape[1])
    for chunk in order.split(4):
        metric.update(x[chunk], y[chunk])
    assert float(metric.compute()) == pytest.approx(pairwise_r2(x, y), abs=1e-6)
    assert metric.sum_of_means.numel() == x.shape[1]  # O(P): no per-class sums kept
    metric.reset()
    with pytest.raises(ValueError, match="class 0 came back"):
        metric.update(x[y == 0], y[y == 0]), metric.update(x[y == 1], y[y == 1]), metric.update(x[y == 0], y[y == 0])


def test_self_pairs_bias_r2_by_about_one_minus_r2_over_n():
    # The README's statement: n examples per class give about R² + (1 - R²)/n.
    torch.manual_seed(0)
    x, y = clustered([4000] * 5, spread=2.0)
    full = class_separation(x, y)
    small = [class_separation(x[torch.cat([torch.nonzero(y == c).flatten()[i * 20:(i + 1) * 20] for c in range(5)])],
                              torch.arange(5).repeat_interleave(20)) for i in range(100)]
    assert sum(small) / len(small) - full == pytest.approx((1 - full) / 20, rel=0.15)


def test_bad_input_is_named():
    x, y = clustered([3, 3])
    with pytest.raises(ValueError, match="labels must lie in"):
        class_separation(x, y + 5, num_classes=3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_separation(x[:3], y[:3])


def _rank(rank: int, world: int, port: int, x, y, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metric = ClassSeparation(dim=x.shape[1])
    mine = torch.cat([torch.nonzero(y == c).flatten() for c in range(rank, 4, world)])  # whole classes per rank
    for chunk in mine.split(3):
        metric.update(x[chunk], y[chunk])
    out[rank] = float(metric.compute())
    dist.destroy_process_group()


def test_two_ddp_processes_give_the_single_process_value(free_port):
    x, y = clustered([9, 4, 12, 6])
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(2, free_port, x, y, out), nprocs=2)
    assert out[0] == out[1] == pytest.approx(class_separation(x, y), abs=1e-6)
