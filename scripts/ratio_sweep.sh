#!/usr/bin/env bash
# Imbalance-ratio sweep (paper Table 4): PGD-AT and RoBal-N on CIFAR-10-LT with ratios 10, 20, 50 and 100 in the
# CPU reference setting (configs/cifar10_lt/ratio_sweep/). For each config: train into
# runs/cifar10_lt/ratio_sweep/NAME (resumed if interrupted), then clean + PGD-20 on the 10,000 test images into
# NAME/eval.json; a run whose eval.json exists is skipped. With AA=1 also AutoAttack (aa-paper) on the fixed
# stratified 1,000-image subset into NAME/eval_aa.json. The JSONs are copied to docs/results/ratio_sweep/ and
# one table is written to docs/results/ratio_sweep.md.
#
#   scripts/ratio_sweep.sh [--dry-run]          # AA=1 scripts/ratio_sweep.sh  adds AutoAttack
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "ratio_sweep.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
if [ -z "${ROBAL:-}" ]; then
  if [ -x .venv/bin/robal ]; then ROBAL=.venv/bin/robal; else ROBAL=robal; fi
fi
RUNS=runs/cifar10_lt/ratio_sweep
RESULTS=docs/results/ratio_sweep

run() {
  echo "+ $*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

evaluated=()
for method in pgd_at robal_n; do
  for ratio in 10 20 50 100; do
    name=${method}_r${ratio}
    out=$RUNS/$name
    echo "== $name"
    if [ -f "$out/eval.json" ]; then
      echo "= $out/eval.json exists"
    else
      [ -f "$out/model.pt" ] || run "$ROBAL" train "configs/cifar10_lt/ratio_sweep/$name.yaml" --out "$out" \
        --resume auto --quiet
      run "$ROBAL" eval "$out" --attacks clean,pgd20 --json "$out/eval.json"
    fi
    if [ "${AA:-0}" = 1 ] && [ ! -f "$out/eval_aa.json" ]; then
      run "$ROBAL" eval "$out" --attacks aa-paper --n-test 1000 --json "$out/eval_aa.json"
    fi
    if [ "$DRY" = 0 ]; then
      mkdir -p "$RESULTS"
      for kind in eval eval_aa; do
        if [ -f "$out/$kind.json" ]; then cp "$out/$kind.json" "$RESULTS/$name.$kind.json"; fi
      done
      if [ -f "$out/eval.json" ]; then evaluated+=("$out"); fi
    fi
  done
done

if [ "$DRY" = 0 ] && [ ${#evaluated[@]} -gt 0 ]; then
  "$ROBAL" report "${evaluated[@]}" --out docs/results/ratio_sweep.md
fi
