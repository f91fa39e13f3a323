#!/bin/bash
# Submit a sweep as one SLURM array job: a task per config, each run as slurm/train.sbatch runs one.
#
#   slurm/sweep.sh [sbatch flags] CONFIG.yaml ... [cli.py overrides]
#   slurm/sweep.sh configs/imagenet/{softmax,label_smoothing,sigmoid,extra_final_l2,penultimate_dropout,logit_penalty,logit_norm,cosine_softmax,squared_error}.yaml
#   slurm/sweep.sh --nodes=2 --partition=gpu configs/imagenet/cosine_softmax_temperature/*.yaml
#
# Arguments before the first .yaml are sbatch flags; after it, .yaml files are the configs and the
# rest are overrides for every task.
set -euo pipefail
cd "$(dirname "$0")/.."
flags=(); rest=()
for arg in "$@"; do
  if [[ ${#rest[@]} -eq 0 && $arg != *.yaml ]]; then flags+=("$arg"); else rest+=("$arg"); fi
done
count=0
for arg in "${rest[@]}"; do [[ $arg == *.yaml ]] && count=$((count + 1)); done
if (( count == 0 )); then
  echo "usage: slurm/sweep.sh [sbatch flags] CONFIG.yaml ... [cli.py overrides]" >&2
  exit 2
fi
for arg in "${rest[@]}"; do
  if [[ $arg == *.yaml && ! -f $arg ]]; then echo "sweep.sh: no config $arg" >&2; exit 2; fi
done
exec sbatch --array="0-$((count - 1))" "${flags[@]}" slurm/train.sbatch "${rest[@]}"
