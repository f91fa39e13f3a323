"""Block×block minibatch CKA (Figure 2): Gram matrices once per layer against Grams recomputed per pair.

Default: two synthetic "small ResNets" of 9 layers each (block outputs from 64×16×16 to 512×2×2 and a pooled
512), post-ReLU activations driven by a shared latent so that CKA is far from 0 and 1, ``--batches``
batches of ``--n`` examples. Both methods see the same activations, side by side in one run:

- ``gram once``: ``MinibatchCKA`` fed each batch's A + B Gram matrices; every pair's HSIC₁ comes from one
  (A, n²) @ (n², B) matmul of the flattened zero-diagonal Grams plus one of their row sums;
- ``per pair``: the straightforward loop: for every pair (i, j) and batch, gram(layer i of A),
  gram(layer j of B), and ``unbiased_hsic`` of (K, L), (K, K), (L, L): 2·A·B Gram products per batch
  instead of A + B.

It prints the seconds of each, the speed-up and the largest |difference| of the two CKA matrices. Memory of
either is bounded by one batch: a Gram matrix is n×n float64 per layer, whatever the layer's width, and the
states are A·B + A + B float64 sums; the activations themselves are the benchmark's input, not its cost.

``--resnet50`` instead runs the product's comparison pass (``study.cka.Comparison``: forward hooks on the
16 bottleneck blocks that reduce each output to its Gram matrix at once, and the pooled penultimate layer:
17 layers) for two ResNet-50s (random weights, eval mode) over synthetic 224×224 images, and prints seconds
per 1,000 images with and without CKA.

    python benchmarks/cka_speed.py                                   # CPU, under a minute
    python benchmarks/cka_speed.py --device cuda --resnet50          # GPU: 10,000 images in batches of 500
    python benchmarks/cka_speed.py --device cpu --resnet50 --images 64 --batch 32   # CPU smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from measurements.cka import MinibatchCKA, gram, unbiased_hsic

# Block outputs of a CIFAR-style ResNet-18 on 16×16 inputs, two blocks per stage, then the pooled features.
SMALL_RESNET_LAYERS = [(64, 16, 16)] * 2 + [(128, 8, 8)] * 2 + [(256, 4, 4)] * 2 + [(512, 2, 2)] * 2 + [(512, 1, 1)]


def synthetic_batches(n: int, batches: int, device: torch.device, seed: int = 0):
    """``batches`` pairs (net A's layers, net B's layers) of post-ReLU float32 activations of n examples."""
    g = torch.Generator().manual_seed(seed)
    latent_dim = 16

    def network():
        return [torch.randn(latent_dim, c * h * w, generator=g) / latent_dim**0.5 for c, h, w in SMALL_RESNET_LAYERS]

    weights_a, weights_b = network(), network()
    out = []
    for _ in range(batches):
        z = torch.randn(n, latent_dim, generator=g)
        acts = []
        for weights in (weights_a, weights_b):
            acts.append([(z @ w + torch.randn(n, w.shape[1], generator=g)).relu_().reshape(n, *shape).to(device)
                         for w, shape in zip(weights, SMALL_RESNET_LAYERS)])
        out.append(tuple(acts))
    return out


def gram_once(batches) -> torch.Tensor:
    metric = MinibatchCKA(len(batches[0][0]), len(batches[0][1])).to(batches[0][0][0].device)
    for acts_a, acts_b in batches:
        metric.update(torch.stack([gram(x) for x in acts_a]), torch.stack([gram(y) for y in acts_b]))
    return metric.compute()


def per_pair(batches) -> torch.Tensor:
    num_a, num_b = len(batches[0][0]), len(batches[0][1])
    device = batches[0][0][0].device
    kl, kk, ll = (torch.zeros(num_a, num_b, dtype=torch.float64, device=device) for _ in range(3))
    for acts_a, acts_b in batches:
        for i in range(num_a):
            for j in range(num_b):
                K, L = gram(acts_a[i]), gram(acts_b[j])
                kl[i, j] += unbiased_hsic(K, L)
                kk[i, j] += unbiased_hsic(K, K)
                ll[i, j] += unbiased_hsic(L, L)
    return kl / (kk * ll).sqrt()


def timed(fn, *args, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "n/a"
    return result, seconds, peak


def compare(args, device: torch.device) -> None:
    batches = synthetic_batches(args.n, args.batches, device, args.seed)
    num_a, num_b = len(batches[0][0]), len(batches[0][1])
    gram(batches[0][0][0])  # warm-up: BLAS / cuBLAS initialisation falls outside both timings
    cka_once, t_once, mem_once = timed(gram_once, batches, device=device)
    cka_pair, t_pair, mem_pair = timed(per_pair, batches, device=device)
    diff = float((cka_once - cka_pair).abs().max())
    grams_mb = (num_a + num_b) * args.n**2 * 8 / 2**20
    inputs_mb = sum(x.numel() * 4 for acts in batches[0] for x in acts) / 2**20
    print(f"{num_a}×{num_b} layers {SMALL_RESNET_LAYERS[0]}..{SMALL_RESNET_LAYERS[-1]}, {args.batches} batches "
          f"of n = {args.n}, {device}")
    print(f"{'method':<10} {'Gram products':>14} {'seconds':>9} {'peak MiB':>9}")
    print(f"{'gram once':<10} {(num_a + num_b) * args.batches:>14} {t_once:>9.3f} {mem_once:>9}")
    print(f"{'per pair':<10} {2 * num_a * num_b * args.batches:>14} {t_pair:>9.3f} {mem_pair:>9}")
    print(f"speed-up {t_pair / t_once:.1f}× (target ≥ 5×); max |CKA difference| {diff:.2e} (target ≤ 1e-6); "
          f"CKA range {float(cka_once.min()):.3f}..{float(cka_once.max()):.3f}")
    print(f"memory: Gram matrices of one batch {grams_mb:.1f} MiB ((A+B)·n²·8 B), states "
          f"{(num_a * num_b + num_a + num_b) * 8} B; one batch's activations (the input) {inputs_mb:.1f} MiB")


def resnet50(args, device: torch.device) -> None:
    """The product's own pass (``study.cka.Comparison``: hooks that reduce each block's output to its Gram
    matrix, MinibatchCKA) for two ResNet-50s, against their plain forward passes."""
    from lightning_modules import ObjectiveClassifier
    from study.cka import Comparison
    from study.passes import Loaded

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = ObjectiveClassifier(num_classes=1000, backbone="resnet50", ema_decay=None).eval()
        nets.append(Loaded(f"resnet50/seed{seed}", module, Path(f"seed{seed}"), False))
    comparison = Comparison(nets, [(nets[0].name, nets[1].name)], None, [], agreement=False).to(device).eval()
    if device.type == "cuda":
        comparison.to(memory_format=torch.channels_last)
    g = torch.Generator(device=device).manual_seed(args.seed)
    steps = -(-args.images // args.batch)

    def batches():
        for step in range(steps):
            images = torch.randn(min(args.batch, args.images - step * args.batch), 3, 224, 224, generator=g, device=device)
            yield images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images

    def forward_only():
        for images in batches():
            for net in nets:
                net.module.eval_network(images)

    def with_cka():
        for step, images in enumerate(batches()):
            comparison.validation_step((images, torch.zeros(len(images), dtype=torch.long, device=device)), step)
        return comparison.pair_cka[0].compute()

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")  # as training runs
    with torch.no_grad(), autocast:
        for net in nets:  # warm-up (cuDNN's algorithm choice) outside the timings
            net.module.eval_network(torch.randn(min(args.batch, 8), 3, 224, 224, device=device))
        _, t_forward, mem_forward = timed(forward_only, device=device)
        cka, t_cka, mem_cka = timed(with_cka, device=device)
    layers = len(nets[0].layers)
    per_k = 1000 / args.images
    print(f"two ResNet-50s (random weights, eval{', bf16 autocast' if device.type == 'cuda' else ''}), {layers} layers each, "
          f"{args.images} images of 224×224 in batches of {args.batch}, {device}")
    print(f"{'pass':<16} {'s / 1,000 images':>17} {'peak MiB':>9}")
    print(f"{'forward only':<16} {t_forward * per_k:>17.3f} {mem_forward:>9}")
    print(f"{'forward + CKA':<16} {t_cka * per_k:>17.3f} {mem_cka:>9}")
    print(f"CKA overhead {t_cka / t_forward - 1:+.0%}; diagonal CKA {float(cka.diagonal().min()):.3f}.."
          f"{float(cka.diagonal().max()):.3f}; NaN: {bool(cka.isnan().any())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=250, help="examples per batch (synthetic layers)")
    parser.add_argument("--batches", type=int, default=2, help="batches (synthetic layers)")
    parser.add_argument("--resnet50", action="store_true", help="two ResNet-50s on synthetic images instead")
    parser.add_argument("--images", type=int, default=10_000, help="images (--resnet50)")
    parser.add_argument("--batch", type=int, default=500, help="images per batch (--resnet50)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    resnet50(args, device) if args.resnet50 else compare(args, device)


if __name__ == "__main__":
    main()
