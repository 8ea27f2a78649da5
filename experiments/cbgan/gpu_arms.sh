#!/usr/bin/env bash
# CBGAN's configured (non-CPU) arms on one GPU, with Inception FID / KID on the whole balanced test split:
# MNIST-LT and Fashion-MNIST-LT (imbalance 100), the classifier in the loop, then the GAN with the
# class-balancing regulariser (cbgan.yaml, lambda 10) and without it (baseline.yaml, lambda 0): width 32,
# batch 256, 20,000 G steps, paired relativistic loss, same seed per pair. Each dataset is one
# `cvlab run --seeds` of its pipeline.yaml, so the run writes a results record (per-seed values, mean, sd)
# under $ROOT/cbgan_<dataset>/record.json.
#
#   CVLAB_DATA=<data> experiments/cbgan/gpu_arms.sh              # everything: 2 datasets x 2 seeds x 3 stages
#   CVLAB_DATA=<data> experiments/cbgan/gpu_arms.sh --dry-run    # parse every stage and print the commands
#   STEPS=2000 SEEDS=1 DATASETS=mnist_lt experiments/cbgan/gpu_arms.sh   # a shorter GAN budget (say so)
#
# Environment: SEEDS (2: seeds 0..SEEDS-1), DATASETS ("mnist_lt fashion_mnist_lt"), ROOT (runs/cbgan_gpu),
# STEPS (the GAN stages' trainer.max_steps; unset: the configs' 20,000), ACCELERATOR (gpu; cpu for a smoke
# test), and any further argument is passed to `cvlab run` (e.g. --set 'cbgan.trainer.limit_test_batches=4').
set -euo pipefail
cd "$(dirname "$0")/../.."

SEEDS=${SEEDS:-2}
DATASETS=${DATASETS:-mnist_lt fashion_mnist_lt}
ROOT=${ROOT:-runs/cbgan_gpu}
ACCELERATOR=${ACCELERATOR:-gpu}

sets=(--set "*.trainer.accelerator=$ACCELERATOR" --set "*.trainer.devices=1"
      --set "*.trainer.enable_progress_bar=false")
if [[ -n "${STEPS:-}" ]]; then
  for arm in cbgan baseline; do
    sets+=(--set "$arm.trainer.max_steps=$STEPS" --set "$arm.trainer.val_check_interval=$(( (STEPS + 1) / 2 ))")
  done
fi

for ds in $DATASETS; do
  start=$(date +%s)
  uv run cvlab run "experiments/cbgan/$ds/pipeline.yaml" --root "$ROOT" --seeds "$SEEDS" "${sets[@]}" "$@"
  echo "cbgan gpu_arms: $ds done in $(( $(date +%s) - start )) s (record: $ROOT/cbgan_$ds/record.json)"
done
