#!/usr/bin/env bash
# Run the experiment grid.
#   ./MAIN_run_experiments.sh                 quick digits suite on the CPU (same as: cpu)
#   ./MAIN_run_experiments.sh 0               the paper grid on GPU 0
#   ./MAIN_run_experiments.sh 0,1,2,3         the paper grid, one run at a time on each GPU
#   ./MAIN_run_experiments.sh 0 --table cifar100_full_resnet --seeds "1 2 3"
#   ./MAIN_run_experiments.sh --slurm --slurm-partition gpu --table cifar20_sub_vit   # SLURM job arrays
#   ./MAIN_run_experiments.sh --print-commands --table cifar20_sub_vit    # one command per run (GNU parallel)
#   ./MAIN_run_experiments.sh --suite privacy many-model privacy statistics (privacy.py; its --help)
#   ./MAIN_run_experiments.sh --help          every flag (environment variables SUITE, TABLE, SEEDS,
#                                             METHODS, CLASSES, RESULTS work too)
# Completed runs are skipped, so after an interruption the same command continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
# The privacy suite has its own driver, privacy.py, which builds on experiments.py.
suite="${SUITE:-}"
previous=""
for arg in "$@"; do
    if [ "$previous" = "--suite" ]; then suite="$arg"; fi
    case "$arg" in --suite=*) suite="${arg#--suite=}" ;; esac
    previous="$arg"
done
if [ "$suite" = "privacy" ]; then
    exec "$PY" privacy.py "$@"
fi
exec "$PY" experiments.py "$@"
