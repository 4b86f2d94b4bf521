#!/usr/bin/env bash
# Every CPU-reference row of the study (CIFAR-10-LT rho 50, DESIGN.md section 3), resumable:
#   - train the run if runs/cifar10_lt/NAME/model.pt is missing (post-hoc rows: `robal adjust` of the PGD-AT run;
#     fine-tune rows start from it, so pgd_at comes first), or copy docs/results/models/NAME.pt, the weights
#     an earlier session committed, when it exists,
#   - clean + PGD-20 on all 10,000 test images      -> runs/cifar10_lt/NAME/eval_full.json
#   - AutoAttack (aa-paper, aa) on the fixed stratified 1,000-image subset -> runs/cifar10_lt/NAME/eval_aa.json
#   - copy both JSONs to docs/results/NAME.eval_full.json, NAME.eval_aa.json; reports in docs/results/study_*.md.
# Results that exist are skipped, so the script can be stopped and started again.
#
#   scripts/study.sh [--dry-run] [NAME ...]     # default: every row; --dry-run prints the commands only
#
# Rows: every configs/cifar10_lt/*.yaml (paper Tables 1-2, the balanced controls, and the later methods AT-BSL,
# AT-BSL-AuA, REAT, TAET, class-wise eps) and configs/cifar10_lt/posthoc/*.yaml. The ratio sweep is
# scripts/ratio_sweep.sh. Set ROBAL to choose the executable (default .venv/bin/robal, else robal on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
ROWS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) ROWS+=("$arg") ;;
  esac
done
if [ -z "${ROBAL:-}" ]; then
  if [ -x .venv/bin/robal ]; then ROBAL=.venv/bin/robal; else ROBAL=robal; fi
fi
CONFIGS=configs/cifar10_lt
RUNS=runs/cifar10_lt
RESULTS=docs/results

run() {
  echo "+ $*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

if [ ${#ROWS[@]} -eq 0 ]; then
  ROWS=(pgd_at)
  for f in "$CONFIGS"/*.yaml; do   # training rows, fine-tunes last (they start from the PGD-AT run)
    n=$(basename "$f" .yaml)
    case "$n" in pgd_at|finetune_*) ;; *) ROWS+=("$n") ;; esac
  done
  for f in "$CONFIGS"/finetune_*.yaml "$CONFIGS"/posthoc/*.yaml; do
    [ -f "$f" ] && ROWS+=("$(basename "$f" .yaml)")
  done
fi

produce() {  # train (or adjust) the run of row $1 if its model is missing
  local name=$1 out=$RUNS/$1
  if [ -f "$out/model.pt" ]; then
    echo "= $out/model.pt exists"
  elif [ -f "$RESULTS/models/$name.pt" ]; then   # weights committed by an earlier session
    run mkdir -p "$out"
    run cp "$RESULTS/models/$name.pt" "$out/model.pt"
  elif [ -f "$CONFIGS/$name.yaml" ]; then
    run "$ROBAL" train "$CONFIGS/$name.yaml" --out "$out" --resume auto --quiet
  elif [ -f "$CONFIGS/posthoc/$name.yaml" ]; then
    run "$ROBAL" adjust "$RUNS/pgd_at" --inference-file "$CONFIGS/posthoc/$name.yaml" --out "$out/model.pt"
  else
    echo "study.sh: no config for row '$name' in $CONFIGS or $CONFIGS/posthoc" >&2
    return 2
  fi
}

evaluate() {  # the two evaluations of row $1, each skipped when its JSON exists, then copied to docs/results
  local name=$1 out=$RUNS/$1
  if [ -f "$out/eval_full.json" ]; then echo "= $out/eval_full.json exists"; else
    run "$ROBAL" eval "$out" --attacks clean,pgd20 --json "$out/eval_full.json"
  fi
  if [ -f "$out/eval_aa.json" ]; then echo "= $out/eval_aa.json exists"; else
    run "$ROBAL" eval "$out" --attacks aa-paper,aa --n-test 1000 --json "$out/eval_aa.json"
  fi
  if [ "$DRY" = 0 ]; then
    mkdir -p "$RESULTS"
    for kind in eval_full eval_aa; do
      if [ -f "$out/$kind.json" ]; then cp "$out/$kind.json" "$RESULTS/$name.$kind.json"; fi
    done
  fi
}

for name in "${ROWS[@]}"; do
  echo "== $name"
  produce "$name"
  evaluate "$name"
done

if [ "$DRY" = 0 ]; then
  for kind in eval_full eval_aa; do
    done_runs=()
    for name in "${ROWS[@]}"; do
      if [ -f "$RUNS/$name/$kind.json" ]; then done_runs+=("$RUNS/$name/$kind.json"); fi
    done
    if [ ${#done_runs[@]} -gt 0 ]; then "$ROBAL" report "${done_runs[@]}" --out "$RESULTS/study_${kind#eval_}.md"; fi
  done
fi
