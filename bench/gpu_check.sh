#!/usr/bin/env bash
# One GPU check of prefix, sized for a single device-tool call of at most 8 minutes (docs/performance.md,
# "Measuring on a GPU"). On one CUDA GPU, with python3's torch (or $PYTHON):
#   0. nvidia-smi, torch / CUDA / Triton versions, the GPU's name and bf16 peak;
#   1. configs/gpt2-124m.yaml, bf16, torch.compile on vs off: tokens/s and MFU (metrics/train.jsonl);
#   2. SIGTERM mid-run -> final checkpoint -> exit 143 -> restart -> resume, compared bitwise (per-step losses,
#      final weights) with an uninterrupted run; two uninterrupted runs first say whether bf16 + compile on
#      CUDA is deterministic at all (reported, not failed, when it is not);
#   3. checkpoint stall: periodic saves with checkpoint.async=true vs false (step 1's runs) vs a plain
#      torch.save of the same model + AdamW on the GPU;
#   4. trainer.parallelism=fsdp on one GPU (skipped on a checkout whose --print-config has no such key).
# Results: "${OUT:-bench/results/gpu}"/summary.json, gpu_check.log (this output), nvidia-smi.txt and
# runs.tar.gz (the runs' metrics and logs, no checkpoints). Exit 0 when every check passed, 1 when one
# failed, 3 when prefix does not import (a Python package missing: carry wheels, see --fetch-wheels).
#
#   bash bench/gpu_check.sh              on the GPU machine (device tool: carry .gpu-wheels)
#   bash bench/gpu_check.sh --dry-run    here: print every GPU command, then run a tiny CPU version of each step
#   bash bench/gpu_check.sh --fetch-wheels   here, once: the wheels prefix needs that the device image lacks
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

MODE=gpu
FETCH=0
for arg in "$@"; do
    case $arg in
        --dry-run) MODE=dry ;;
        --fetch-wheels) FETCH=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg" >&2; usage >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
WHEELS=${GPU_CHECK_WHEELS:-.gpu-wheels}
# What `python -m prefix.train` imports that the device image (docs: /work/.library/device/KINDS.md) lacks;
# versions as constraints.txt pins them (zstd: the newest with a cp312 manylinux wheel).
WHEEL_SPECS=(mosaicml-streaming==0.13.0 structlog==26.1.0 brotli==1.2.1 catalogue==2.0.10 cramjam==2.14.0
             python-snappy==0.7.3 zstd==1.5.6.1)

PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

if (( FETCH )); then
    platforms=()
    for n in 17 24 26 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    mkdir -p "$WHEELS"
    for spec in "${WHEEL_SPECS[@]}"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "$spec" ||
            { echo "gpu_check.sh: could not download $spec" >&2; exit 1; }
    done
    ls -l "$WHEELS"
    exit 0
fi

OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
RUNS=$WORK/runs
RESULTS=$WORK/results
LOGS=$WORK/logs
COMMANDS=$WORK/commands.txt
mkdir -p "$RUNS" "$RESULTS" "$LOGS"
touch "$COMMANDS"
trap 'jobs -p | xargs -r kill 2>/dev/null; rm -rf "$WORK"' EXIT  # launches still running (a failed wait) first
exec > >(tee "$OUT/gpu_check.log") 2>&1
exec 3>&1  # where the commands are printed, whatever a command's own output is redirected to
EXEC=1

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PREFIX_CACHE_DIR=${PREFIX_CACHE_DIR:-$REPO/.cache/prefix}
HELPER=(bench/gpu_check.py)
STEPS=(env throughput resume checkpoint_stall fsdp)
BUDGET=${GPU_CHECK_BUDGET_S:-330}  # seconds; a step not started by then is skipped (the call's limit: 8 min)
SECONDS=0

# settings gpu|cpu: the sizes of every step. cpu is the dry run's tiny version (configs/tiny.yaml, fp32 (bf16
# is slow on a CPU), compile off).
settings() {
    if [[ $1 == gpu ]]; then
        CONFIG=configs/gpt2-124m.yaml DEVICE=cuda PRECISION=bf16 COMPILE_ON=true TIMEOUT=240
        T_STEPS=${GPU_CHECK_STEPS:-300} T_LOG=10 T_EVERY=100
        T_BATCH=(trainer.global_batch_size=32 trainer.micro_batch_size=16)  # 32k tokens a step
        R_STEPS=80 R_EVERY=20 R_SIGNAL=30
        R_BATCH=(trainer.global_batch_size=16 trainer.micro_batch_size=8)
        F_STEPS=100
    else
        CONFIG=configs/tiny.yaml DEVICE=cpu PRECISION=fp32 COMPILE_ON=false TIMEOUT=120
        T_STEPS=9 T_LOG=3 T_EVERY=4 R_STEPS=40 R_EVERY=10 R_SIGNAL=12 F_STEPS=10
        T_BATCH=() R_BATCH=()
    fi
    COMMON=(trainer.device="$DEVICE" trainer.precision="$PRECISION" trainer.sample_tokens=0 trainer.eval_every=0
            telemetry.progress=never checkpoint.every_seconds=0)
}

# x CMD...: print the command; run it unless only printing the plan (EXEC=0).
x() {
    printf '+ %s\n' "$(printf '%q ' "$@")" >&3
    (( EXEC )) || return 0
    printf '%s\n' "$*" >>"$COMMANDS"
    "$@"
}

# train NAME OVERRIDE...: the training command of one run (into the array CMD).
train() {
    local name=$1
    shift
    CMD=(timeout "$TIMEOUT" "$PY" -m prefix.train --config "$CONFIG" --run-name "$name" --runs-root "$RUNS"
         "${COMMON[@]}" "$@")
}

# launch LOG CMD...: start in the background (the PID in LAST_PID; 0 when only printing).
launch() {
    local log=$1
    shift
    printf '+ %s > %s 2>&1 &\n' "$(printf '%q ' "$@")" "$log" >&3
    LAST_PID="<pid of ${log##*/}>"
    (( EXEC )) || return 0
    printf '%s\n' "$*" >>"$COMMANDS"
    "$@" >"$log" 2>&1 &
    LAST_PID=$!
}

# finish PID LOG: wait for a launch; its exit code in CODE (the log's tail when it is not 0 or 143).
finish() {
    CODE=0
    if (( ! EXEC )); then echo "+ wait $1" >&3; return; fi
    wait "$1" || CODE=$?
    if (( CODE != 0 && CODE != 143 )); then tail -n 30 "$2"; fi
}

out_of_time() {
    (( EXEC && SECONDS > BUDGET )) || return 1
    echo "gpu_check.sh: ${SECONDS} s spent (budget ${BUDGET} s): step $1 skipped"
    return 0
}

step_env() {
    echo "== [${SECONDS} s] 0. environment"
    if [[ $DEVICE == cuda ]]; then
        x nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$OUT/nvidia-smi.txt"
    else
        echo "nvidia-smi: skipped in the dry run" >"$OUT/nvidia-smi.txt"
    fi
    local want=()
    [[ $DEVICE == cuda ]] && want=(--want-cuda)
    x "$PY" "${HELPER[@]}" env "$RESULTS/env.json" --nvidia-smi "$OUT/nvidia-smi.txt" "${want[@]}"
}

step_throughput() {
    echo "== [${SECONDS} s] 1. throughput: $CONFIG, $PRECISION, compile $COMPILE_ON vs false, $T_STEPS steps"
    local shared=(trainer.max_steps="$T_STEPS" trainer.log_every="$T_LOG" checkpoint.every_steps="$T_EVERY"
                  "${T_BATCH[@]}")
    train compile trainer.compile="$COMPILE_ON" checkpoint.async=true "${shared[@]}"
    x "${CMD[@]}" >"$LOGS/compile.log" 2>&1
    CODE_COMPILE=$?
    train eager trainer.compile=false checkpoint.async=false "${shared[@]}"
    x "${CMD[@]}" >"$LOGS/eager.log" 2>&1
    CODE_EAGER=$?
    (( CODE_COMPILE == 0 )) || tail -n 30 "$LOGS/compile.log"
    (( CODE_EAGER == 0 )) || tail -n 30 "$LOGS/eager.log"
    local mfu=()
    [[ $DEVICE == cuda ]] && mfu=(--want-mfu)
    x "$PY" "${HELPER[@]}" throughput "$RESULTS/throughput.json" --labels compile eager \
        --runs "$RUNS/compile" "$RUNS/eager" --codes "$CODE_COMPILE" "$CODE_EAGER" \
        --max-steps "$T_STEPS" --skip "$T_LOG" "${mfu[@]}"
}

step_resume() {
    echo "== [${SECONDS} s] 2. SIGTERM at step $R_SIGNAL of $R_STEPS -> exit 143 -> resume, bitwise vs uninterrupted runs"
    local shared=(trainer.compile="$COMPILE_ON" trainer.max_steps="$R_STEPS" trainer.log_every=1
                  checkpoint.every_steps="$R_EVERY" "${R_BATCH[@]}")
    # the two uninterrupted runs and the interrupted one side by side (results do not depend on it)
    train det-a "${shared[@]}"; launch "$LOGS/det-a.log" "${CMD[@]}"; local pid_a=$LAST_PID
    train det-b "${shared[@]}"; launch "$LOGS/det-b.log" "${CMD[@]}"; local pid_b=$LAST_PID
    train resumed "${shared[@]}"; launch "$LOGS/resumed-1.log" "${CMD[@]}"; local pid_r=$LAST_PID
    if x "$PY" "${HELPER[@]}" wait-step "$RUNS/resumed" "$R_SIGNAL" --pid "$pid_r" --timeout "$TIMEOUT"; then
        x kill -TERM "$pid_r"  # to `timeout`, which passes it on, as torchrun does to its workers
    fi
    local first second code_a code_b
    finish "$pid_r" "$LOGS/resumed-1.log"; first=$CODE
    if (( EXEC )); then echo "interrupted run: exit $first"; fi
    launch "$LOGS/resumed-2.log" "${CMD[@]}"
    finish "$LAST_PID" "$LOGS/resumed-2.log"; second=$CODE
    finish "$pid_a" "$LOGS/det-a.log"; code_a=$CODE
    finish "$pid_b" "$LOGS/det-b.log"; code_b=$CODE
    if (( EXEC )); then echo "restart: exit $second; uninterrupted runs: exit $code_a, $code_b"; fi
    x "$PY" "${HELPER[@]}" resume "$RESULTS/resume.json" --a "$RUNS/det-a" --b "$RUNS/det-b" --r "$RUNS/resumed" \
        --code-a "$code_a" --code-b "$code_b" --code-first "$first" --code-second "$second" \
        --max-steps "$R_STEPS" --signal-at "$R_SIGNAL"
}

step_stall() {
    echo "== [${SECONDS} s] 3. checkpoint stall: async vs sync periodic saves (step 1's runs) vs a plain torch.save"
    x "$PY" "${HELPER[@]}" plain-save "$WORK/plain.json" --config "$CONFIG" --device "$DEVICE" --folder "$RUNS" \
        --overrides "${COMMON[@]}"
    x "$PY" "${HELPER[@]}" stall "$RESULTS/checkpoint_stall.json" --async-run "$RUNS/compile" \
        --sync-run "$RUNS/eager" --plain "$WORK/plain.json" --max-steps "$T_STEPS"
}

step_fsdp() {
    echo "== [${SECONDS} s] 4. trainer.parallelism=fsdp on one GPU"
    x "$PY" -m prefix.train --config "$CONFIG" "${COMMON[@]}" --print-config >"$WORK/print-config.yaml"
    local has=1
    if (( EXEC )); then
        "$PY" "${HELPER[@]}" has-key "$WORK/print-config.yaml" trainer.parallelism && has=0
    else
        echo "+ (when that --print-config has trainer.parallelism; else the skip below)"
    fi
    if (( has == 0 || ! EXEC )); then
        local code=0
        CMD=(timeout "$TIMEOUT" "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 -m prefix.train
             --config "$CONFIG" --run-name fsdp --runs-root "$RUNS" "${COMMON[@]}" trainer.parallelism=fsdp
             trainer.compile="$COMPILE_ON" trainer.max_steps="$F_STEPS" trainer.log_every="$T_LOG"
             checkpoint.every_steps=0 "${T_BATCH[@]}")
        x "${CMD[@]}" >"$LOGS/fsdp.log" 2>&1 || code=$?
        (( code == 0 )) || tail -n 30 "$LOGS/fsdp.log"
        x "$PY" "${HELPER[@]}" fsdp "$RESULTS/fsdp.json" --run "$RUNS/fsdp" --code "$code" \
            --max-steps "$F_STEPS" --skip "$T_LOG"
    fi
    if (( has != 0 )); then
        if (( EXEC )); then echo "fsdp: not built yet (prefix train --print-config has no trainer.parallelism): skipped"; fi
        x "$PY" "${HELPER[@]}" fsdp "$RESULTS/fsdp.json" \
            --skipped "not built yet: prefix train --print-config has no trainer.parallelism key"
    fi
}

summarize() {
    "$PY" "${HELPER[@]}" summary "$OUT/summary.json" --results "$RESULTS" --mode "$MODE" --elapsed "$SECONDS" \
        --steps "${STEPS[@]}" --commands "$COMMANDS" "$@"
}

partial() { if (( EXEC )); then summarize; fi; }  # a partial summary survives a call cut off at its limit

plan() {
    step_env
    if ! out_of_time throughput; then step_throughput; partial; fi
    if ! out_of_time resume; then step_resume; partial; fi
    if ! out_of_time checkpoint_stall; then step_stall; partial; fi
    if ! out_of_time fsdp; then step_fsdp; fi
}

if [[ $MODE == dry ]]; then
    echo "== the GPU plan (printed, not run; python there: \$PYTHON, else .venv/bin/python if present, else python3)"
    settings gpu
    EXEC=0
    plan
    EXEC=1
    echo
    echo "== dry run: the same steps, tiny and on the CPU"
fi

if [[ $MODE == gpu && -d $WHEELS ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    x "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$WHEELS"/*.whl || exit 3
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
if ! x "$PY" -c "import prefix.train, structlog, yaml; from prefix.data.compat import streaming"; then
    echo "gpu_check.sh: prefix does not import with $PY (a package missing? bash bench/gpu_check.sh --fetch-wheels" \
         "here, then carry $WHEELS)"
    EXEC=1 summarize --final
    exit 3
fi

if [[ $MODE == gpu ]]; then settings gpu; else settings cpu; fi
plan
summarize --final
status=$?
tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*/checkpoints' logs runs commands.txt 2>/dev/null ||
    echo "gpu_check.sh: could not pack the runs' files"
exit "$status"
