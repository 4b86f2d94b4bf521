#!/usr/bin/env bash
# One prepared GPU check (issue 30): everything robal promises on a GPU, in one short run (under 8 minutes on one
# H100/H200), every output under OUT_DIR:
#   1. gpu_tests.txt, gpu_tests.xml: the tests marked `gpu` (tests/test_gpu.py: every attack, one training step of
#      every framework, the cosine head, checkpoint and resume, the eval JSON, bf16 agreement), each against the
#      CPU within its stated tolerance;
#   2. bench_train_fp32.txt, bench_train_bf16.txt: benchmarks/bench_train.py on ResNet-18 (images/s of a PGD-5 AT
#      and a TRADES step against a reference loop and the kernel bound), fp32 and bf16;
#      bf16_pgd_at.json/.txt, bf16_robal_n.json/.txt: benchmarks/bench_bf16.py on the committed CPU-reference
#      models (input-gradient sign agreement, clean/PGD-20 on 1,000 images and AA-paper on 1,000, fp32 vs bf16,
#      with seconds); aa_1000.json: standard AutoAttack on the stratified 1,000 (its seconds);
#   3. torchrun_train.txt, torchrun_eval.json: a one-process torchrun (NCCL on CUDA) of train and eval on a
#      small config;
#   summary.txt: each step, its exit status and seconds; env.txt: torch, CUDA, the GPU.
# The script goes on after a failed step and exits 1 if any failed.
#
#   scripts/gpu_check.sh OUT_DIR [--device cuda|cpu] [--tiny] [--cifar PATH]
#   --device cpu --tiny: every step on a tiny model on the CPU (about 2 minutes; tests/test_gpu_check.py runs it):
#     the gpu tests CPU against CPU, bench_train on a width-8 PreAct-ResNet-18, bench_bf16 on a tiny digits run,
#     torchrun with gloo.
#   --cifar PATH: CIFAR-10 .npz for the CIFAR steps (default ../shared/data/cifar10.npz, else shared/data/...);
#     without it the CIFAR steps are reported as skipped.
# Set ROBAL_PY to choose the Python (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [--device cuda|cpu] [--tiny] [--cifar PATH]}
shift
DEVICE=cuda
TINY=0
CIFAR=
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:?gpu_check.sh: --device needs cuda or cpu}; shift ;;
    --tiny) TINY=1 ;;
    --cifar) CIFAR=${2:?gpu_check.sh: --cifar needs a path}; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
case "$DEVICE" in cuda|cuda:*|cpu) ;; *) echo "gpu_check.sh: --device $DEVICE: expected cuda or cpu" >&2; exit 2 ;; esac
if [ -z "${ROBAL_PY:-}" ]; then
  if [ -x .venv/bin/python ]; then ROBAL_PY=.venv/bin/python; else ROBAL_PY=python3; fi
fi
if [ -z "$CIFAR" ]; then
  for c in ../shared/data/cifar10.npz shared/data/cifar10.npz; do [ -f "$c" ] && CIFAR=$c && break; done
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0

step() {  # step NAME LOGFILE COMMAND...: run, log stdout+stderr, record status and seconds
  local name=$1 log=$2 start rc
  shift 2
  start=$(date +%s%N)
  echo "== $name: $*" | tee -a "$OUT/commands.txt"
  "$@" > "$log" 2>&1
  rc=$?
  local ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '%-22s %s  %4d.%01d s  %s\n' "$name" "$([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)")" \
    $((ms / 1000)) $((ms % 1000 / 100)) "$(basename "$log")" | tee -a "$SUMMARY"
  [ $rc = 0 ] || FAILED=1
}

skip() { printf '%-22s skipped: %s\n' "$1" "$2" | tee -a "$SUMMARY"; }

"$ROBAL_PY" - > "$OUT/env.txt" 2>&1 <<'EOF'
import platform, torch, robal
print("robal", robal.__version__, "torch", torch.__version__, "python", platform.python_version())
print("cuda available:", torch.cuda.is_available(), "cuda", torch.version.cuda, "nccl:",
      torch.distributed.is_nccl_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", p.name, f"{p.total_memory / 2**30:.0f} GiB")
EOF
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONWARNINGS=ignore

# 1. the gpu tests
if [ "$TINY" = 1 ]; then export ROBAL_GPU_TEST_TINY=1; fi
step gpu_tests "$OUT/gpu_tests.txt" env ROBAL_GPU_TEST_DEVICE="$DEVICE" "$ROBAL_PY" -m pytest -m gpu tests/test_gpu.py \
  -q -rs -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"

# 3 first in --tiny: its run is the trained model of bench_bf16 there
TR=(train configs/digits_lt/pgd_at.yaml --set "device=$DEVICE" --set train.checkpoint_every=5 --quiet)
if [ "$TINY" = 1 ]; then TR+=(--set model.backbone_args.width=4 --set train.epochs=2 --set "train.lr_milestones=[]"); fi
rm -rf "$OUT/torchrun_run"
step torchrun_train "$OUT/torchrun_train.txt" "$ROBAL_PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m robal "${TR[@]}" --out "$OUT/torchrun_run"
step torchrun_eval "$OUT/torchrun_eval.txt" "$ROBAL_PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m robal eval "$OUT/torchrun_run" --attacks clean,pgd20 --device "$DEVICE" --checks none \
  --json "$OUT/torchrun_eval.json"

# 2. speed and bf16
if [ "$TINY" = 1 ]; then
  # width 8: narrower channels_last convolutions crash torch 2.13's CPU build (oneDNN)
  BENCH=(--backbone preact_resnet18 --width 8 --quick --frameworks pgd_at --set train.batch_size=16)
else
  BENCH=(--backbone resnet18)
fi
step bench_train_fp32 "$OUT/bench_train_fp32.txt" "$ROBAL_PY" benchmarks/bench_train.py "${BENCH[@]}" --device "$DEVICE"
step bench_train_bf16 "$OUT/bench_train_bf16.txt" "$ROBAL_PY" benchmarks/bench_train.py "${BENCH[@]}" --device "$DEVICE" \
  --set train.amp=bf16
if [ "$TINY" = 1 ]; then
  step bf16_tiny "$OUT/bf16_tiny.txt" "$ROBAL_PY" benchmarks/bench_bf16.py --checkpoint "$OUT/torchrun_run" \
    --device "$DEVICE" --n 100 --n-aa 20 --json "$OUT/bf16_tiny.json"
elif [ -n "$CIFAR" ]; then
  for row in pgd_at robal_n; do
    step "bf16_$row" "$OUT/bf16_$row.txt" "$ROBAL_PY" benchmarks/bench_bf16.py \
      --checkpoint "docs/results/models/$row.pt" --data-path "$CIFAR" --device "$DEVICE" --n 1000 --n-aa 1000 \
      --json "$OUT/bf16_$row.json"
  done
  mkdir -p "$OUT/aa_run"
  cp docs/results/models/pgd_at.pt "$OUT/aa_run/model.pt"
  step aa_1000 "$OUT/aa_1000.txt" "$ROBAL_PY" -m robal eval "$OUT/aa_run" --attacks aa --n-test 1000 --device "$DEVICE" \
    --checks none --data-path "$CIFAR" --json "$OUT/aa_1000.json"
else
  skip bf16_cifar "no CIFAR-10 .npz (--cifar PATH)"
fi

echo "summary: $SUMMARY"
exit $FAILED
