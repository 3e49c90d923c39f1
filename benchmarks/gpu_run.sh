#!/usr/bin/env bash
# One call on a lent GPU machine: install the carried wheels, then run the named stages, each under its own
# time limit, writing logs and tables to $OUT (default benchmarks/out). Used by the lead on the device tool:
#   bash benchmarks/gpu_run.sh cuda_tests grpo_step fsdp_smoke
# Stages: cuda_tests kernels_tests kernels_bench sft_step grpo_step fsdp_smoke sft_gpu_check
set -u
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    cuda_tests)    timeout 200 python3 -m pytest -q -m cuda tests --deselect tests/gpu/test_kernels.py -x -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/cuda_tests.txt" ;;
    kernels_tests) timeout 170 python3 -m pytest -q -m cuda tests/gpu/test_kernels.py -s 2>&1 | tail -30 | tee "$OUT/kernels_cuda_tests.txt" ;;
    kernels_bench) timeout 230 python3 benchmarks/kernels.py --budget-s 100 --jsonl "$OUT/kernels.jsonl" --md "$OUT/kernels.md" 2>&1 | tail -20 ;;
    sft_step)      timeout ${SFT_TIMEOUT:-300} python3 benchmarks/sft_step.py --out "$OUT" ${SFT_ARGS:-} 2>&1 | grep -v "Writing model\|Loading weights" | tail -25 ;;
    grpo_step)     timeout ${GRPO_TIMEOUT:-330} python3 benchmarks/grpo_step.py --out "$OUT" 2>&1 | grep -v "Writing model\|Loading weights" | tail -25 ;;
    fsdp_smoke)    timeout ${FSDP_TIMEOUT:-150} python3 benchmarks/fsdp_smoke.py --out "$OUT" 2>&1 | tail -15 ;;
    sft_gpu_check) timeout 200 python3 benchmarks/sft_gpu_check.py --out "$OUT" 2>&1 | tail -15 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done $(date +%T)"
