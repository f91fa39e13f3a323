"""Module criticality (``study.criticality.Criticality``): every perturbed network run whole, against run from the block
its module is in, on what enters that block at the final weights (computed once per batch).

Default: the transfer study's criticality (configs/studies/transfer.yaml, after ``make transfer-study``): its runs,
grid (alphas, sigmas, draws), layers and images, one process. Both methods run side by side, alternating,
``--repeats`` times each; it prints the seconds of each, the speed-up, and whether the results are identical.

    python benchmarks/criticality_speed.py                       # p_t/seed0 and ri_t/seed0, ~4 min on 2 cores
    python benchmarks/criticality_speed.py --runs p_t --repeats 1
"""

from __future__ import annotations

import argparse
import time

from study.criticality import criticality
from study.runs import run_states
from study.spec import Study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="configs/studies/transfer.yaml")
    parser.add_argument("--runs", nargs="*", help="experiments of the study's criticality (default: all of them)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    study = Study.load(args.study)
    plan = study.transfer
    names = [n for n in plan.criticality if not args.runs or n.split("/")[0] in args.runs]
    states = run_states(study)
    folders = {name: states[name].folder for name in names}
    seconds = {False: 0.0, True: 0.0}
    results = {}
    for _ in range(args.repeats):
        for cache in (False, True):
            for name, folder in folders.items():
                start = time.perf_counter()
                results[name, cache] = criticality(
                    str(folder), str(folder / "checkpoints" / "epoch000.ckpt"), plan.alphas, plan.sigmas, plan.draws,
                    plan.epsilon, plan.admissible, plan.modules, plan.seed, images=plan.images,
                    batch_size=plan.batch_size, cache=cache)
                seconds[cache] += time.perf_counter() - start
    same = all(results[name, False] == results[name, True] for name in names)
    print(f"criticality of {', '.join(names)} ({len(plan.alphas)} alphas x {len(plan.sigmas)} sigmas x {plan.draws} draws, "
          f"{plan.images} images, by {plan.modules}), {args.repeats} repeat(s)")
    print(f"  every network run whole: {seconds[False] / args.repeats:7.1f} s")
    print(f"  from the module's block: {seconds[True] / args.repeats:7.1f} s")
    print(f"  speed-up {seconds[False] / seconds[True]:.2f}x; results identical: {same}")


if __name__ == "__main__":
    main()
