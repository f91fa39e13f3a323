#!/bin/bash
# Submit a sweep as one SLURM array job: a task per config (x seed), each run as slurm/train.sbatch runs one.
#
#   slurm/sweep.sh [sbatch flags] [--seeds=0,1,...] CONFIG.yaml ... [cli.py overrides]
#   slurm/sweep.sh --seeds=0,1,2 configs/imagenet/{softmax,label_smoothing,sigmoid,extra_final_l2,penultimate_dropout,logit_penalty,logit_norm,cosine_softmax,squared_error}.yaml
#   slurm/sweep.sh --nodes=2 --partition=gpu configs/imagenet/cosine_softmax_temperature/*.yaml
#
# Arguments before the first .yaml are sbatch flags (and --seeds: every config runs once per seed, as
# --seed_everything=<seed>, in its own folder <name>/seed<k>); after it, .yaml files are the configs and the
# rest are overrides for every task. A whole study, with its analysis after the array:
# python -m study submit configs/studies/<study>.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
flags=(); rest=(); seeds=()
for arg in "$@"; do
  if [[ ${#rest[@]} -eq 0 && $arg == --seeds=* ]]; then IFS=, read -r -a seeds <<< "${arg#--seeds=}"
  elif [[ ${#rest[@]} -eq 0 && $arg != *.yaml ]]; then flags+=("$arg"); else rest+=("$arg"); fi
done
for seed in "${seeds[@]}"; do
  if [[ ! $seed =~ ^[0-9]+$ ]]; then echo "sweep.sh: --seeds takes non-negative integers, e.g. --seeds=0,1,2 (got $seed)" >&2; exit 2; fi
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
tasks=$count
if (( ${#seeds[@]} > 0 )); then
  tasks=$((count * ${#seeds[@]}))
  rest=("--seeds=$(IFS=,; echo "${seeds[*]}")" "${rest[@]}")
fi
exec sbatch --array="0-$((tasks - 1))" "${flags[@]}" slurm/train.sbatch "${rest[@]}"
