"""What bf16 autocast does to each objective's logits and gradients, with the head in bf16 (autocast's
choice for a Linear) and in float32 (``ObjectiveClassifier.logits``), both against float64.

The features are the same bf16 tensor in every arm (what a bf16 backbone hands the head); only the head's
arithmetic differs. The head is nearly trained, where precision matters most: each example's features
lie near its class mean, the class weights point at the centred means, and the head is scaled so the
correct logit sits where a trained network puts it (15 for the softmax family, 12 for sigmoid, M = 60
for squared error; cosine softmax and logit normalisation fix their own scale through tau). Cosine
softmax is also run at tau = 0.01, the low end of Table 4's sweep.

Errors are relative to float64 (loss: |l - l64| / |l64|; gradient of the head weight: ||g - g64|| / ||g64||);
logit error is the largest absolute one. The float32 head costs nothing that shows: 3 x 2048 x 1000
multiply-adds per image forward and backward, against ResNet-50's ~12 G (0.05 %). CPU autocast leaves
F.normalize in bf16 where CUDA's lifts it to float32, so cosine softmax and logit normalisation's bf16
figures are a little worse on the CPU than a GPU's (``--device cuda``).

    python benchmarks/bf16_head.py --examples 512 --classes 1000
"""

from __future__ import annotations

import argparse

import torch

from lightning_modules import ObjectiveClassifier, objective_classes
from lightning_modules.objectives import CosineSoftmax, Objective

TRAINED_CORRECT_LOGIT = {"SquaredError": 60.0, "Sigmoid": 12.0}  # others: 15
SCALED_BY_TAU = ("CosineSoftmax", "LogitNorm")


def trained_head(module: ObjectiveClassifier, means: torch.Tensor, features: torch.Tensor, target: torch.Tensor):
    head = module.network.head
    with torch.no_grad():
        centred = means - means.mean(0)
        head.weight.copy_(centred / centred.norm(dim=1, keepdim=True))
        head.bias.zero_()
        name = type(module.objective).__name__
        if name not in SCALED_BY_TAU:
            correct = module.logits(features, module.network).gather(1, target[:, None]).mean()
            head.weight.mul_(TRAINED_CORRECT_LOGIT.get(name, 15.0) / correct)


def loss_and_grad(module: ObjectiveClassifier, features: torch.Tensor, target: torch.Tensor, arm: str):
    """Loss, head-weight gradient and logits with the head in float64, bf16 (autocast) or float32 (ours)."""
    net, objective = module.network, module.objective
    net.head.weight.grad = None
    if arm == "float64":
        net.head.double()
        logits = objective.logits(features.double(), net.head)
        loss = sum(objective.loss_terms(logits, target, net.head).values())
    else:  # as in training_step, which Lightning runs under autocast
        with torch.autocast(features.device.type, dtype=torch.bfloat16):
            logits = objective.logits(features, net.head) if arm == "bf16" else module.logits(features, net)
            loss = sum(objective.loss_terms(logits, target, net.head).values())
    loss.backward()
    result = loss.double().item(), net.head.weight.grad.double().clone(), logits.detach().double()
    net.head.float()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--backbone", default="resnet50", help="sets the feature width (2048 for resnet50)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--noise", type=float, default=5.0, help="feature noise around the class means")
    args = parser.parse_args()

    torch.manual_seed(0)
    objectives: list[tuple[str, Objective | str]] = [(name, name) for name in sorted(objective_classes())]
    objectives.append(("CosineSoftmax tau=0.01", CosineSoftmax(temperature=0.01)))
    print(f"{args.examples} examples, {args.classes} classes, {args.backbone} features, on {args.device}; "
          "errors against float64")
    print(f"{'objective':24s} {'loss':>9s} | {'bf16 head: loss':>15s} {'logit':>8s} {'grad':>8s} | "
          f"{'fp32 head: loss':>15s} {'logit':>8s} {'grad':>8s}")
    for label, objective in objectives:
        module = ObjectiveClassifier(objective, num_classes=args.classes, backbone=args.backbone, ema_decay=None)
        module.to(args.device)
        module.eval()  # dropout off: every arm sees the same logits
        width = module.network.head.in_features
        means = torch.relu(torch.randn(args.classes, width, device=args.device))
        target = torch.randint(0, args.classes, (args.examples,), device=args.device)
        features = (means[target] + args.noise * torch.randn(args.examples, width, device=args.device)).bfloat16()
        trained_head(module, means, features, target)
        loss64, grad64, logits64 = loss_and_grad(module, features, target, "float64")
        row = [f"{label:24s} {loss64:9.4f}"]
        for arm in ("bf16", "float32"):
            loss, grad, logits = loss_and_grad(module, features, target, arm)
            row.append(f"{abs(loss - loss64) / abs(loss64):15.1e} {(logits - logits64).abs().max():8.1e} "
                       f"{(grad - grad64).norm() / grad64.norm():8.1e}")
        print(" | ".join(row))


if __name__ == "__main__":
    main()
