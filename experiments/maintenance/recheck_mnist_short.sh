#!/usr/bin/env bash
# Short-budget re-check of every system on real MNIST, same seed, in one source tree; run it on the tree before
# and after a refactor and compare the metrics.json files (every key but wall times must be equal):
#   CVLAB_DATA=<data> experiments/maintenance/recheck_mnist_short.sh <tree> <out>
set -u
TREE=$1; mkdir -p "$2"; OUT=$(cd "$2" && pwd)
export CVLAB_DATA=${CVLAB_DATA:?set CVLAB_DATA to the data root}  OMP_NUM_THREADS=1 CVLAB_LOGGER=csv WANDB_MODE=offline PYTHONPATH=$TREE
PY=${PY:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python}
cd $TREE
run() { local name=$1; shift; local t0=$(date +%s); $PY -m experiments.cli "$@" --run.dir=$OUT/$name > $OUT/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - t0 ))s" >> $OUT/summary.txt; }
run teacher fit --config experiments/teachers/mnist_lenet5.yaml --trainer.max_epochs=1 --data.init_args.augment=none --trainer.enable_progress_bar=false
T=$OUT/teacher/checkpoints/last.ckpt
run synth predict --config experiments/zskd/mnist/synthesize.yaml --config experiments/zskd/tf_port_impressions.yaml --model.init_args.teacher=$T --data.init_args.num_impressions=1000 --model.init_args.iterations=100 --trainer.precision=32-true --trainer.enable_progress_bar=false
run student fit --config experiments/zskd/mnist/student.yaml --model.init_args.teacher=$T --data.init_args.pool.init_args.folder=$OUT/synth/shards --trainer.max_epochs=10 --trainer.enable_progress_bar=false
run student_real fit --config experiments/zskd/mnist/student_real.yaml --model.init_args.teacher=$T --trainer.max_epochs=1 --trainer.enable_progress_bar=false
run lra fit --config experiments/lra/mnist/lra.yaml --model.init_args.teacher=$T --trainer.max_epochs=1 --data.init_args.steps_per_epoch=5 --model.init_args.batch_size=128 --trainer.enable_progress_bar=false
run dc fit --config experiments/dc/mnist/ipc1.yaml --trainer.max_steps=5 --trainer.callbacks.init_args.num_nets=2 --trainer.callbacks.init_args.epochs=20 "--trainer.callbacks.init_args.archs=[convnet]" "--trainer.callbacks.init_args.baselines=[]" --trainer.enable_progress_bar=false
run idlg predict --config experiments/idlg/mnist/idlg.yaml --data.init_args.num_trials=20 --data.init_args.trials_per_batch=20 --model.init_args.iterations=50 --trainer.enable_progress_bar=false
run uap fit --config experiments/data_impressions/mnist/uap_real.yaml --model.init_args.model=$T --data.init_args.pool.init_args.max_size=500 --trainer.max_epochs=1 --trainer.enable_progress_bar=false
echo done >> $OUT/summary.txt
