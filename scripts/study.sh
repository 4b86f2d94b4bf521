#!/usr/bin/env bash
# Every row of the study (CIFAR-10-LT rho 50; the CPU reference setting of DESIGN.md section 3), resumable:
#   - train the run if runs/cifar10_lt/NAME/model.pt is missing (post-hoc rows: `robal adjust` of the PGD-AT run,
#     the 80-epoch one for a post-hoc row NAME_e80;
#     fine-tune rows start from it, so pgd_at comes first), or copy docs/results/models/NAME.pt, the weights
#     an earlier session committed, when it exists; a row NAME_seedN is NAME.yaml trained with --set seed=N;
#     a row it trains gets its weights and training log copied to docs/results/models/NAME.pt and
#     docs/results/NAME.train_log.jsonl, to be committed with its JSONs,
#   - evaluate, each evaluation skipped when its JSON exists, and copy the JSONs to docs/results/NAME.KIND.json:
#       full protocol (default), the sizes of issue 9:
#         eval_full: clean + PGD-20 on all 10,000 test images
#         eval_aa:   AutoAttack (aa-paper, aa) on the fixed stratified 1,000-image subset
#       --subset-1000, the full protocol's AA-paper without standard AA (about 8 minutes per row at one thread):
#         eval_1000: clean, PGD-20 and AA-paper on the stratified 1,000-image subset, no reliability checks
#       --aa-10step, the 10-step AutoAttack of later papers beside the official AA (issue 28):
#         eval_aa10step: aa-10step on the fixed stratified 1,000-image subset, no reliability checks
#       --sweep-sizes, the imbalance-ratio sweep's sizes (issue 28 item 2; scripts/ratio_sweep.sh):
#         eval_full and eval_1000 as above (no standard AA)
#       --cpu-protocol, what a 2-core session affords (about 5 minutes per row at one thread):
#         eval_clean_10k: clean on all 10,000 test images
#         eval_300:       clean, PGD-20, AA-paper and the reliability checks on the stratified 300-image subset
#   - one `robal report` table per evaluation kind: docs/results/study_KIND.md.
# Results that exist are skipped, so the script can be stopped and started again.
# Work longer than a sitting: `--save-progress NAME` copies an unfinished training's newest epoch checkpoint,
# config and log, and the batch-by-batch state of unfinished evaluations (KIND.json.partial/), to
# docs/results/progress/NAME, to be committed, since runs/ does not outlive a checkout; a later sitting's study.sh
# puts them back and resumes from them (bit-exact). Each piece goes when its training or evaluation ends.
#
#   scripts/study.sh [--dry-run] [--cpu-protocol | --subset-1000 | --aa-10step | --sweep-sizes | --save-progress]
#                    [--configs DIR] [NAME ...]
#   (default: every row, full protocol; --dry-run: print the commands only)
#   --configs DIR: the rows of another config folder under configs/cifar10_lt, e.g. the full-scale GPU rows
#   configs/cifar10_lt/full (WRN-34-10) or configs/cifar10_lt/full/resnet18; runs go to runs/cifar10_lt/REST and
#   results to docs/results/REST, REST being DIR's path below configs/cifar10_lt.
#
# Rows: every configs/cifar10_lt/*.yaml, or DIR/*.yaml (paper Tables 1-2, the balanced controls, and the later
# methods AT-BSL, AT-BSL-AuA, REAT, TAET, class-wise eps), the seed repeats of PGD-AT and RoBal-N, and
# configs/cifar10_lt/posthoc/*.yaml. The ratio sweep is scripts/ratio_sweep.sh.
# Set ROBAL to choose the executable (default .venv/bin/robal, else robal on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
PROTOCOL=full
ROWS=()
CONFIGS=configs/cifar10_lt
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --cpu-protocol) PROTOCOL=cpu ;;
    --subset-1000) PROTOCOL=subset ;;
    --aa-10step) PROTOCOL=aa10step ;;
    --sweep-sizes) PROTOCOL=sweep ;;
    --save-progress) PROTOCOL=progress ;;
    --configs) CONFIGS=${2:?study.sh: --configs needs a folder}; CONFIGS=${CONFIGS%/}; shift ;;
    -h|--help) sed -n '2,39p' "$0"; exit 0 ;;
    *) ROWS+=("$1") ;;
  esac
  shift
done
case "$CONFIGS" in
  configs/cifar10_lt|configs/cifar10_lt/*) ;;
  *) echo "study.sh: --configs $CONFIGS: expected configs/cifar10_lt or a folder below it" >&2; exit 2 ;;
esac
if [ ! -d "$CONFIGS" ]; then echo "study.sh: --configs $CONFIGS: no such folder" >&2; exit 2; fi
if [ -z "${ROBAL:-}" ]; then
  if [ -x .venv/bin/robal ]; then ROBAL=.venv/bin/robal; else ROBAL=robal; fi
fi
RUNS=runs/${CONFIGS#configs/}
RESULTS=docs/results${CONFIGS#configs/cifar10_lt}

run() {
  echo "+ $*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

ALL_ROWS=(pgd_at)
for f in "$CONFIGS"/*.yaml; do   # training rows, fine-tunes last (they start from the PGD-AT run)
  n=$(basename "$f" .yaml)
  case "$n" in pgd_at|finetune_*) ;; *) ALL_ROWS+=("$n") ;; esac
done
ALL_ROWS+=(pgd_at_seed1 pgd_at_seed2 robal_n_seed1 robal_n_seed2)
for f in "$CONFIGS"/finetune_*.yaml "$CONFIGS"/posthoc/*.yaml; do
  [ -f "$f" ] && ALL_ROWS+=("$(basename "$f" .yaml)")
done
if [ ${#ROWS[@]} -eq 0 ]; then ROWS=("${ALL_ROWS[@]}"); fi

keep_weights() {  # copy the weights and training log of the run row $1 just trained next to its JSONs
  run mkdir -p "$RESULTS/models"
  run cp "$RUNS/$1/model.pt" "$RESULTS/models/$1.pt"
  run cp "$RUNS/$1/log.jsonl" "$RESULTS/$1.train_log.jsonl"
  if [ -d "$RESULTS/progress/$1" ]; then run rm -r "$RESULTS/progress/$1"; fi   # its unfinished state, now done
}

save_progress() {  # row $1's unfinished training (newest epoch checkpoint, config, log) and evaluations, to commit
  local out=$RUNS/$1 keep=$RESULTS/progress/$1 newest="" f state
  if [ -d "$out" ] && [ ! -f "$out/model.pt" ]; then
    newest=$(find "$out" -maxdepth 1 -name 'epoch_*.pt' | sort | tail -n 1)
  fi
  if [ -n "$newest" ]; then
    run mkdir -p "$keep"
    run cp "$out/config.yaml" "$out/log.jsonl" "$newest" "$keep/"
    for f in "$keep"/epoch_*.pt; do   # the older epochs the folder held
      if [ -f "$f" ] && [ "$(basename "$f")" != "$(basename "$newest")" ]; then run rm "$f"; fi
    done
  fi
  for state in "$out"/*.json.partial; do
    [ -d "$state" ] || continue
    run mkdir -p "$keep"
    if [ -d "$keep/$(basename "$state")" ]; then run rm -r "$keep/$(basename "$state")"; fi
    run cp -r "$state" "$keep/"
    newest=$state
  done
  if [ -z "$newest" ]; then echo "= nothing unfinished in $out"; fi
}

restore_progress() {  # a committed unfinished training of row $1 into its empty run directory, for --resume auto
  local out=$RUNS/$1 keep=$RESULTS/progress/$1
  if [ ! -f "$out/config.yaml" ] && [ -d "$keep" ]; then
    run mkdir -p "$out"
    run cp "$keep"/config.yaml "$keep"/log.jsonl "$keep"/epoch_*.pt "$out/"
  fi
}

posthoc_base() {  # the run post-hoc row $1 adjusts: PGD-AT of the same schedule (NAME_e80: the 80-epoch one)
  case "$1" in *_e80) echo pgd_at_e80 ;; *) echo pgd_at ;; esac
}

produce() {  # train (or adjust) the run of row $1 if its model is missing
  local name=$1 out=$RUNS/$1
  case "$name" in   # these rows start from the PGD-AT run
    finetune_*) produce pgd_at ;;
    *) if [ -f "$CONFIGS/posthoc/$name.yaml" ]; then produce "$(posthoc_base "$name")"; fi ;;
  esac
  if [ -f "$out/model.pt" ]; then
    echo "= $out/model.pt exists"
  elif [ -f "$RESULTS/models/$name.pt" ]; then   # weights committed by an earlier session
    run mkdir -p "$out"
    run cp "$RESULTS/models/$name.pt" "$out/model.pt"
  elif [ -f "$CONFIGS/$name.yaml" ]; then
    restore_progress "$name"
    run "$ROBAL" train "$CONFIGS/$name.yaml" --out "$out" --resume auto --quiet
    keep_weights "$name"
  elif [[ "$name" =~ ^(.+)_seed([0-9]+)$ ]] && [ -f "$CONFIGS/${BASH_REMATCH[1]}.yaml" ]; then
    restore_progress "$name"
    run "$ROBAL" train "$CONFIGS/${BASH_REMATCH[1]}.yaml" --set "seed=${BASH_REMATCH[2]}" --out "$out" \
      --resume auto --quiet
    keep_weights "$name"
  elif [ -f "$CONFIGS/posthoc/$name.yaml" ]; then
    run "$ROBAL" adjust "$RUNS/$(posthoc_base "$name")" --inference-file "$CONFIGS/posthoc/$name.yaml" \
      --out "$out/model.pt"
  else
    echo "study.sh: no config for row '$name' in $CONFIGS or $CONFIGS/posthoc" >&2
    return 2
  fi
}

case "$PROTOCOL" in
  full) KINDS=(eval_full eval_aa) ;;
  subset) KINDS=(eval_1000) ;;
  cpu) KINDS=(eval_clean_10k eval_300) ;;
  aa10step) KINDS=(eval_aa10step) ;;
  sweep) KINDS=(eval_full eval_1000) ;;
esac

eval_args() {  # the `robal eval` arguments of evaluation kind $1
  case "$1" in
    eval_full) echo "--attacks clean,pgd20" ;;
    eval_aa) echo "--attacks aa-paper,aa --n-test 1000" ;;
    eval_1000) echo "--attacks clean,pgd20,aa-paper --n-test 1000 --checks none" ;;
    eval_clean_10k) echo "--attacks clean --checks none" ;;
    eval_aa10step) echo "--attacks aa-10step --n-test 1000 --checks none" ;;
    eval_300) echo "--attacks clean,pgd20,aa-paper --n-test 300" ;;
  esac
}

evaluate() {  # the evaluations of row $1, each skipped when its JSON is in docs/results (committed or copied)
  local name=$1 out=$RUNS/$1 keep=$RESULTS/progress/$1 kind
  for kind in "${KINDS[@]}"; do
    if [ -f "$RESULTS/$name.$kind.json" ]; then echo "= $RESULTS/$name.$kind.json exists"; continue; fi
    if [ ! -f "$out/$kind.json" ]; then
      if [ ! -d "$out/$kind.json.partial" ] && [ -d "$keep/$kind.json.partial" ]; then   # committed progress
        run cp -r "$keep/$kind.json.partial" "$out/"
      fi
      # shellcheck disable=SC2046
      run "$ROBAL" eval "$out" $(eval_args "$kind") --json "$out/$kind.json"
    fi
    if [ "$DRY" = 0 ]; then
      mkdir -p "$RESULTS"
      cp "$out/$kind.json" "$RESULTS/$name.$kind.json"
    fi
    if [ -d "$keep/$kind.json.partial" ]; then run rm -r "$keep/$kind.json.partial"; fi
  done
}

needs_run() {  # 0 when row $1 lacks an evaluation JSON in docs/results
  local kind
  for kind in "${KINDS[@]}"; do [ -f "$RESULTS/$1.$kind.json" ] || return 0; done
  return 1
}

if [ "$PROTOCOL" = progress ]; then
  for name in "${ROWS[@]}"; do save_progress "$name"; done
  exit 0
fi

for name in "${ROWS[@]}"; do
  echo "== $name"
  if needs_run "$name"; then produce "$name"; fi
  evaluate "$name"
done

if [ "$DRY" = 0 ]; then
  for kind in "${KINDS[@]}"; do   # the report covers every row evaluated so far, not only this call's
    done_runs=()
    for name in "${ALL_ROWS[@]}"; do
      if [ -f "$RESULTS/$name.$kind.json" ]; then done_runs+=("$RESULTS/$name.$kind.json"); fi
    done
    if [ ${#done_runs[@]} -gt 0 ]; then "$ROBAL" report "${done_runs[@]}" --out "$RESULTS/study_${kind#eval_}.md"; fi
  done
fi
