#!/usr/bin/env bash
# End-to-end chain on one GPU, ONE command on the GPU machine (the wheels it lacks in .whl/, made by
# benchmarks/wheels.sh):   bash benchmarks/bench_e2e.sh          (budget E2E_BUDGET_S=570 s, ~9-10 min)
# CPU dry run of the same chain (tiny shapes, accelerator cpu, 32-true; DeepSpeed and CUDA tests skipped):
#   E2E_TINY=1 PATH=.venv/bin:$PATH bash benchmarks/bench_e2e.sh
#
# Stages (each under its own time limit, cut to what is left of E2E_BUDGET_S; one JSON status line each):
#   main        e2e/prepare.py: random-weight Qwen2.5-VL-7B-shape base (bf16 safetensors, built on the GPU),
#               the small strategy model and OCR rows (make_demo_ocr_dataset); then, timed by e2e/timing.py's
#               E2ETimer (class_path e2e_timing.E2ETimer):
#               vlm-lightning fit --config recipes/qwen2_5_vl/lora_sft.yaml --config <overrides: model path, data,
#               max_steps, checkpoint every N steps + save_last, num_workers, the timing callback>
#   then, all at once (the export is CPU-bound, the other two need the GPU):
#   export      vlm-lightning export merge --checkpoint <run>/checkpoints/last.ckpt --out merged;
#               e2e/check_merge.py (per tensor, against base + scaling * B@A) beside
#               vlm-lightning export gguf --checkpoint merged --quant q8_0 / --quant q4_k_m (E2E_GGUF_MODE:
#               single = the one command with both quants; parallel = one process per quant at once, the GPU
#               default when the disk allows; sequential = one after the other), each file read by
#               e2e/gguf_inspect.py (GGUFReader: tensor count, type histogram)
#   strategies  lora_sft.yaml + each recipes/strategies/*.yaml for E2E_STRAT_STEPS steps on the small model,
#               each followed by vlm-lightning export merge from its checkpoint (a DeepSpeed checkpoint is a
#               folder: merged as is, and when refused after Lightning's convert_zero_checkpoint_to_fp32_state_dict)
#               and the same per-tensor check
#   cuda_tests  pytest -m cuda tests, less the kernel tests and the 7B-shape SFT check (they have calls of their own:
#               pytest -m cuda tests/gpu/test_kernels.py; pytest -m cuda tests/gpu/test_gpu_checks.py)
# Knobs: E2E_STAGES ("main export strategies cuda_tests"), E2E_STRATEGIES, E2E_STEPS (20), E2E_STRAT_STEPS (4),
# E2E_QUANTS ("q8_0 q4_k_m"), E2E_GGUF_MODE, E2E_BUDGET_S, E2E_WORK (/tmp/e2e), OUT.
# Files in $OUT (7): e2e.jsonl (every figure), e2e.md (tables), env.txt, main.log, export.log, strategies.log,
# cuda_tests.txt.
set -u
set -o pipefail
T0=$(date +%s)
TINY=${E2E_TINY:-0}
BUDGET=${E2E_BUDGET_S:-$([ "$TINY" = 1 ] && echo 3000 || echo 570)}
STAGES=${E2E_STAGES:-main export strategies cuda_tests}
STRATEGIES=${E2E_STRATEGIES:-ddp fsdp fsdp_qlora deepspeed_zero2 deepspeed_zero3}
STEPS=${E2E_STEPS:-$([ "$TINY" = 1 ] && echo 6 || echo 20)}
STRAT_STEPS=${E2E_STRAT_STEPS:-4}
QUANTS=${E2E_QUANTS:-q8_0 q4_k_m}
if [ "$TINY" = 1 ]; then
  OUT=${OUT:-runs/e2e_tiny/out}; WORK=${E2E_WORK:-runs/e2e_tiny/work}
else
  OUT=${OUT:-benchmarks/out}; WORK=${E2E_WORK:-/tmp/e2e}
fi
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd); WORK=$(cd "$WORK" && pwd)
J=$OUT/e2e.jsonl
rm -f "$OUT"/e2e.jsonl "$OUT"/e2e.md "$OUT"/env.txt "$OUT"/*.log "$OUT"/cuda_tests.txt
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1   # no network there
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}

now() { date +%s; }
left() { echo $((BUDGET - ($(now) - T0))); }
jline() { echo "$1" >> "$J"; }
log_env() { echo "== $(date +%T) +$(( $(now) - T0 ))s $*"; }

# ---------------------------------------------------------------------------------------- install
if [ "$TINY" != 1 ] && [ -d .whl ]; then
  log_env "install wheels" | tee -a "$OUT/env.txt"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    && $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/env.txt" 2>&1 \
    || { echo "wheel install failed" | tee -a "$OUT/env.txt"; exit 1; }
fi
# e2e_timing.E2ETimer for --config, from a folder of its own: the repo root (kernels/) on the path would shadow
# the Hub's `kernels` package that transformers and bitsandbytes look for
mkdir -p "$WORK/pypath" && cp benchmarks/e2e/timing.py "$WORK/pypath/e2e_timing.py"
export PYTHONPATH=$WORK/pypath${PYTHONPATH:+:$PYTHONPATH}
if command -v vlm-lightning >/dev/null 2>&1; then VLM=(vlm-lightning); else VLM=($PY -m vlm_lightning.cli); fi
{
  log_env "env (install took $(( $(now) - T0 ))s)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  grep -m1 "model name" /proc/cpuinfo; nproc; free -g | head -2; df -h "$WORK" /dev/shm 2>/dev/null
  $PY - <<'EOF'
import importlib
for n in ("torch", "transformers", "peft", "lightning", "triton", "bitsandbytes", "gguf", "jsonargparse",
          "deepspeed", "llama_cpp", "pydantic"):
    try:
        m = importlib.import_module(n); print(f"{n} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{n} MISSING ({type(e).__name__}: {str(e)[:120]})")
EOF
} >> "$OUT/env.txt" 2>&1
[ "$TINY" != 1 ] && [ -z "${E2E_NO_ENV_CAT:-}" ] && cat "$OUT/env.txt"

# run_stage NAME LIMIT LOG cmd...: the command under min(LIMIT, what is left - 15 s), output appended to LOG,
# a status line {"stage", "kind": "status", "rc", "wall_s", "limit_s"} into e2e.jsonl.
run_stage() {
  local name=$1 limit=$2 logf=$3; shift 3
  local rem=$(( $(left) - 15 ))
  [ "$rem" -lt "$limit" ] && limit=$rem
  if [ "$limit" -lt 20 ]; then
    jline "{\"stage\": \"$name\", \"kind\": \"status\", \"rc\": null, \"skipped\": \"no time left\"}"
    echo "== $name skipped: no time left" >> "$logf"; return 124
  fi
  local t=$(now)
  echo "== $(date +%T) +$(( t - T0 ))s $name (limit ${limit}s): $*" >> "$logf"
  timeout -k 10 "$limit" "$@" >> "$logf" 2>&1
  local rc=$?
  local wall=$(( $(now) - t ))
  echo "== $name rc=$rc wall=${wall}s" >> "$logf"
  jline "{\"stage\": \"$name\", \"kind\": \"status\", \"rc\": $rc, \"wall_s\": $wall, \"limit_s\": $limit, \"timed_out\": $([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)}"
  return $rc
}
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

# overrides on top of the recipes; TINY adds the CPU settings
write_overrides() {  # file model_dir root steps every label workers
  local f=$1 model=$2 root=$3 steps=$4 every=$5 label=$6 workers=$7 lrmon=${8:-0}
  {
    echo "model:"
    echo "  init_args:"
    echo "    model_name_or_path: $model"
    if [ "$TINY" = 1 ]; then
      echo "    dtype: float32"
      [[ $f == *fsdp_qlora* ]] && echo "    bnb_4bit_quant_storage: float32"   # = dtype, as FSDP needs
    fi
    echo "data:"
    echo "  train: $WORK/data/train.jsonl"
    echo "  val: $WORK/data/val.jsonl"
    echo "  num_workers: $workers"
    echo "trainer:"
    echo "  max_steps: $steps"
    echo "  default_root_dir: $root"
    if [ "$TINY" = 1 ]; then
      echo "  accelerator: cpu"
      echo "  devices: 1"
      echo "  precision: 32-true"
    fi
    echo "  callbacks:"
    echo "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint"
    echo "      init_args: {dirpath: $root/checkpoints, save_last: true, every_n_train_steps: $every}"
    if [ "$lrmon" = 1 ]; then
      echo "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor"
      echo "      init_args: {logging_interval: step}"
    fi
    echo "    - class_path: e2e_timing.E2ETimer"
    echo "      init_args: {out: $J, label: $label}"
  } > "$f"
}

TINYFLAG=(); [ "$TINY" = 1 ] && TINYFLAG=(--tiny)
MAIN_RUN=$WORK/run7b
CKPT=$MAIN_RUN/checkpoints/last.ckpt
WORKERS=$([ "$TINY" = 1 ] && echo 1 || echo 4)

# ------------------------------------------------------------------------------------------- main
if has_stage main || has_stage strategies; then
  run_stage prepare 240 "$OUT/main.log" $PY benchmarks/e2e/prepare.py --work "$WORK" "${TINYFLAG[@]}" \
    $(has_stage main || echo --skip-base)
  grep -h "^RESULT " "$OUT/main.log" | tail -1 | sed 's/^RESULT //' >> "$J"
fi
if has_stage main; then
  write_overrides "$WORK/fit7b.yaml" "$WORK/base" "$MAIN_RUN" "$STEPS" $(( STEPS / 2 )) fit7b "$WORKERS" 1
  { echo "== overrides $WORK/fit7b.yaml:"; cat "$WORK/fit7b.yaml"; } >> "$OUT/main.log"
  rm -rf "$MAIN_RUN"
  run_stage fit7b 300 "$OUT/main.log" "${VLM[@]}" fit --config recipes/qwen2_5_vl/lora_sft.yaml --config "$WORK/fit7b.yaml"
fi

# ----------------------------------------------------------------------------- export (background)
free_gb() { df -B1G --output=avail "$1" 2>/dev/null | tail -1 | tr -d ' '; }
gguf_one() {  # label outdir quant-args...: one `vlm-lightning export gguf` process, then GGUFReader on its files
  local label=$1 dir=$2; shift 2
  run_stage "$label" 480 "$OUT/export.log" $PY benchmarks/e2e/export_timed.py --jsonl "$J" --label "$label" -- \
    gguf --checkpoint "$WORK/merged" --out "$dir" "$@"
  run_stage "${label}_inspect" 120 "$OUT/export.log" $PY benchmarks/e2e/gguf_inspect.py "$dir" --jsonl "$J" --label "${label}_inspect"
}
export_chain() {
  local L=$OUT/export.log merged=$WORK/merged
  rm -rf "$merged" "$WORK"/gguf*
  if [ ! -e "$CKPT" ]; then
    jline "{\"stage\": \"merge7b\", \"kind\": \"status\", \"rc\": null, \"skipped\": \"no checkpoint $CKPT\"}"
    return
  fi
  run_stage merge7b 300 "$L" $PY benchmarks/e2e/export_timed.py --jsonl "$J" --label merge7b -- \
    merge --checkpoint "$CKPT" --out "$merged" || return
  # the per-tensor check runs beside the GGUF export (GPU for B@A and the compares, CPU reads)
  (
    run_stage check7b 240 "$WORK/check7b.log" $PY benchmarks/e2e/check_merge.py --base "$WORK/base" \
      --merged "$merged" --ckpt "$CKPT" --label check7b_result --jsonl "$J" \
      --device "$([ "$TINY" = 1 ] && echo cpu || echo cuda)"
    # the base is not needed any more: its 15 GB go to the GGUF files (a 64 GiB disk is short otherwise)
    [ "$TINY" != 1 ] && rm -f "$WORK"/base/*.safetensors
  ) &
  local check_pid=$! tmp=$WORK/tmp shm disk need mode=${E2E_GGUF_MODE:-}
  shm=$(free_gb /dev/shm); disk=$(free_gb "$WORK")
  # GGUFWriter keeps a temp copy of each whole file (TMPDIR) before writing it: RAM-backed /dev/shm if it fits
  [ "${shm:-0}" -ge 30 ] 2>/dev/null && tmp=/dev/shm/e2e_tmp
  mkdir -p "$tmp"; export TMPDIR=$tmp
  # disk the split/parallel export needs once the base is gone (q8_0 + f16 intermediate + q4_k_m of a 7B,
  # plus the temp copies when they are on disk), GB
  need=$(( $([ "$TINY" = 1 ] && echo 1 || echo 33) + $([ "$tmp" = "$WORK/tmp" ] && [ "$TINY" != 1 ] && echo 23 || echo 0) ))
  if [ -z "$mode" ]; then
    if [ "$TINY" = 1 ]; then mode=single
    elif [ $(( ${disk:-0} + $(du -s -B1G "$WORK/base" 2>/dev/null | cut -f1 || echo 0) )) -ge "$need" ]; then mode=parallel
    else mode=sequential; fi
  fi
  jline "{\"stage\": \"gguf_plan\", \"mode\": \"$mode\", \"disk_free_gb\": ${disk:-null}, \"shm_free_gb\": ${shm:-null}, \"tmpdir\": \"$tmp\", \"need_gb\": $need}"
  local qs=($QUANTS)
  case $mode in
    single)   # the exact command of the issue: both quants in one process, in order
      local qargs=(); for q in "${qs[@]}"; do qargs+=(--quant "$q"); done
      gguf_one gguf7b "$WORK/gguf" "${qargs[@]}" ;;
    parallel) # one process per quant at the same time (same files: the first writes the mmproj)
      local pids=() i=0
      for q in "${qs[@]}"; do
        gguf_one "gguf7b_$q" "$WORK/gguf_$q" --quant "$q" $([ $i -gt 0 ] && echo --no-mmproj) &
        pids+=($!); i=$((i + 1))
      done
      for p in "${pids[@]}"; do wait "$p"; done ;;
    *)        # one after the other; each text GGUF deleted once read, the disk being short
      local i=0
      for q in "${qs[@]}"; do
        gguf_one "gguf7b_$q" "$WORK/gguf_$q" --quant "$q" $([ $i -gt 0 ] && echo --no-mmproj)
        rm -f "$WORK/gguf_$q"/merged-*.gguf; i=$((i + 1))
      done ;;
  esac
  rm -rf "$tmp"
  wait "$check_pid"
  cat "$WORK/check7b.log" >> "$L"
}
EXPORT_PID=
if has_stage export; then
  export_chain &
  EXPORT_PID=$!
fi

# ------------------------------------------------------------------------------------- strategies
strategy_merge() {  # name ckpt logfile: merge (DeepSpeed folder: as is, then converted) + per-tensor check
  local s=$1 ck=$2 L=$3 root=$WORK/strat_$1
  if [ -d "$ck" ]; then   # a DeepSpeed checkpoint is a folder
    if run_stage "strat_${s}_merge_folder" 120 "$L" "${VLM[@]}" export merge --checkpoint "$ck" --out "$root/merged"; then
      :
    else
      run_stage "strat_${s}_zero_to_fp32" 120 "$L" $PY -c "import sys; from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict as c; c(sys.argv[1], sys.argv[2])" "$ck" "$root/last_fp32.ckpt" || return
      ck=$root/last_fp32.ckpt
      run_stage "strat_${s}_merge" 120 "$L" "${VLM[@]}" export merge --checkpoint "$ck" --out "$root/merged" || return
    fi
  else
    run_stage "strat_${s}_merge" 120 "$L" "${VLM[@]}" export merge --checkpoint "$ck" --out "$root/merged" || return
  fi
  run_stage "strat_${s}_check" 120 "$L" $PY benchmarks/e2e/check_merge.py --base "$WORK/small" \
    --merged "$root/merged" --ckpt "$ck" --label "strat_${s}_check_result" --jsonl "$J"
}
strategies_stage() {
  local merge_pids=() s root p
  for s in $STRATEGIES; do
    if [ "$TINY" = 1 ] && [[ $s == deepspeed* ]]; then
      jline "{\"stage\": \"strat_${s}_fit\", \"kind\": \"status\", \"rc\": null, \"skipped\": \"CPU dry run: Lightning's DeepSpeedStrategy needs CUDA\"}"
      continue
    fi
    root=$WORK/strat_$s
    rm -rf "$root"; mkdir -p "$root"
    write_overrides "$root/overrides_$s.yaml" "$WORK/small" "$root" "$STRAT_STEPS" "$STRAT_STEPS" "strat_${s}_timer" 2
    run_stage "strat_${s}_fit" 180 "$OUT/strategies.log" "${VLM[@]}" fit --config recipes/qwen2_5_vl/lora_sft.yaml \
      --config "recipes/strategies/$s.yaml" --config "$root/overrides_$s.yaml"
    if [ -e "$root/checkpoints/last.ckpt" ]; then
      OMP_NUM_THREADS=2 strategy_merge "$s" "$root/checkpoints/last.ckpt" "$root/merge.log" &   # CPU, beside the next fit
      merge_pids+=($!)
    else
      jline "{\"stage\": \"strat_${s}_merge\", \"kind\": \"status\", \"rc\": null, \"skipped\": \"no checkpoint\"}"
    fi
  done
  for p in "${merge_pids[@]}"; do wait "$p"; done
  for s in $STRATEGIES; do
    [ -f "$WORK/strat_$s/merge.log" ] && { echo "=== merge log of $s"; cat "$WORK/strat_$s/merge.log"; } >> "$OUT/strategies.log"
  done
}

# ------------------------------------------------------------------------------------- CUDA tests
cuda_tests_stage() {
  if [ "$TINY" = 1 ]; then
    jline '{"stage": "cuda_tests", "kind": "status", "rc": null, "skipped": "CPU dry run"}'
  else
    run_stage cuda_tests 240 "$OUT/cuda_tests.txt" $PY -m pytest -q -m cuda tests --deselect tests/gpu/test_kernels.py \
      --deselect tests/gpu/test_gpu_checks.py::test_sft_lora_and_qlora_on_the_7b_shape \
      -p no:cacheprovider --timeout=200 -rA
    tail -3 "$OUT/cuda_tests.txt" | grep -E "passed|failed|error" | tail -1 | \
      $PY -c "import json,sys; print(json.dumps({'stage': 'cuda_tests_summary', 'summary': sys.stdin.read().strip()}))" >> "$J"
  fi
}

# the GPU jobs (strategy runs, CUDA tests) run beside each other and beside the CPU-bound export chain
GPU_PIDS=()
if has_stage strategies; then OMP_NUM_THREADS=4 strategies_stage & GPU_PIDS+=($!); fi
if has_stage cuda_tests; then OMP_NUM_THREADS=4 cuda_tests_stage & GPU_PIDS+=($!); fi
for p in "${GPU_PIDS[@]}"; do wait "$p"; done

# ----------------------------------------------------------------------------------------- finish
if [ -n "$EXPORT_PID" ]; then
  # the export stages carry their own limits (cut to the budget); this only waits for them
  wait "$EXPORT_PID"
fi
$PY benchmarks/e2e/report.py "$J" > "$OUT/e2e.md" 2>> "$OUT/env.txt" || echo "report failed" >> "$OUT/env.txt"
for f in main.log export.log strategies.log cuda_tests.txt; do   # each log cut to its last 8 MB
  [ -f "$OUT/$f" ] && [ "$(stat -c %s "$OUT/$f")" -gt 8000000 ] && { tail -c 8000000 "$OUT/$f" > "$OUT/$f.t"; mv "$OUT/$f.t" "$OUT/$f"; }
done
log_env "done" | tee -a "$OUT/env.txt"
cat "$OUT/e2e.md"
