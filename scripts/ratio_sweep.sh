#!/usr/bin/env bash
# Imbalance-ratio sweep (paper Table 4): PGD-AT and RoBal-N on CIFAR-10-LT at ratios 10, 20, 50 and 100 in the CPU
# reference setting. Ratio 50 is the study's own `pgd_at` and `robal_n` rows (docs/results/NAME.*); the other
# ratios are configs/cifar10_lt/ratio_sweep/{pgd_at,robal_n}_r{10,20,100}.yaml (the same configs with
# data.imbalance_ratio set), produced the way every study row is:
#   scripts/study.sh --configs configs/cifar10_lt/ratio_sweep --sweep-sizes NAME ...
# trains each run into runs/cifar10_lt/ratio_sweep/NAME (resumed if interrupted; weights and training log copied to
# docs/results/ratio_sweep/), evaluates clean and PGD-20 on the 10,000 test images (NAME.eval_full.json) and clean,
# PGD-20 and AA-paper on the stratified 1,000 (NAME.eval_1000.json), each skipped when its JSON exists. Then
# scripts/ratio_sweep_report.py writes the table docs/results/ratio_sweep.md and the plot docs/results/ratio_sweep.png.
#
#   scripts/ratio_sweep.sh [--dry-run] [NAME ...]   (default: the six rows, PGD-AT first)
set -euo pipefail
cd "$(dirname "$0")/.."

ARGS=()
ROWS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) ARGS+=(--dry-run) ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "ratio_sweep.sh: unknown option $arg" >&2; exit 2 ;;
    *) ROWS+=("$arg") ;;
  esac
done
if [ ${#ROWS[@]} -eq 0 ]; then
  ROWS=(pgd_at_r10 pgd_at_r20 pgd_at_r100 robal_n_r10 robal_n_r20 robal_n_r100)
fi
PYTHON=python
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi

scripts/study.sh "${ARGS[@]}" --configs configs/cifar10_lt/ratio_sweep --sweep-sizes "${ROWS[@]}"
if [ ${#ARGS[@]} -eq 0 ]; then
  "$PYTHON" scripts/ratio_sweep_report.py
else
  echo "+ $PYTHON scripts/ratio_sweep_report.py"
fi
