#!/usr/bin/env bash
# Issue 18's GPU run, sized for a short lease of one H100 or H200, in parts: `tests`, the GPU test
# suite (at most 5 minutes); `engines`, the engine benchmark (ToST-Base and GPT2-Base at 1k, 4k and
# 8k tokens under ZeRO-2 and FSDP2, bf16; about 3 minutes, at most 4); `attention`, the attention
# benchmark on CUDA (one layer, 1k to 16k tokens, then its document-mask mode at 8k; about 1
# minute, at most 2.5). A device command may last 10 minutes: run the tests in one and the
# benchmarks in the next, or all three where the tests are known to be quick.
#
#     OUT=/tmp/gpu-bench bash tools/bench/gpu.sh engines attention   # in a checkout, whose docs/ it writes
#     OUT=/tmp/gpu-bench bash tools/bench/gpu.sh                     # all three parts
#
# Each step runs under its own timeout, and the next step runs whether it passed or not. The
# benchmarks write their sections into this checkout's docs/benchmarks.md, as a user's
# `--write-doc docs/benchmarks.md` would, and after every step the results are copied to $OUT:
# gpu.log (every step's output), engines.json, attention.json, document-mask.json (each benchmark's
# report), benchmarks.md and attention_scaling_gpu.png (what goes back into docs/); 6 files, as
# the device tool brings back at most 8. Needs no network and no install: python3 with a CUDA
# torch, and the project's dependencies importable; where the image lacks some (DeepSpeed, Hydra,
# ...), wheels in $WHEELS (default .whl) are installed into /tmp/site first. Exit status:
# the number of steps that failed.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to the folder for the results}
WHEELS=${WHEELS:-.whl}
parts=" ${*:-tests engines attention} "
for part in $parts; do
    if [[ ! $part =~ ^(tests|engines|attention)$ ]]; then
        echo "gpu.sh: no part $part: use tests, engines, attention" >&2
        exit 2
    fi
done
mkdir -p "$OUT"
LOG=$OUT/gpu.log
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
failed=0

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl >>"$LOG" 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

# step NAME SECONDS COMMAND...: COMMAND under a timeout, stderr to the log and stdout to
# $OUT/NAME.json for the benchmarks (to the log for the others); then a summary line, and the
# docs files to $OUT.
step() {
    local name=$1 seconds=$2 start=$SECONDS status stdout
    shift 2
    case $name in
        preflight | gpu-tests) stdout=$LOG ;;
        *) stdout=$OUT/$name.json ;;
    esac
    echo "== $name (timeout ${seconds} s): $*" | tee -a "$LOG" >&2
    timeout --kill-after=15 "$seconds" "$@" >>"$stdout" 2>>"$LOG"
    status=$?
    echo "== $name: exit $status$([[ $status == 124 ]] && echo ' (timed out)') after $((SECONDS - start)) s" |
        tee -a "$LOG" >&2
    [[ $status == 0 ]] || failed=$((failed + 1))
    cp docs/benchmarks.md "$OUT/" && cp docs/attention_scaling_gpu.png "$OUT/" 2>/dev/null
}

# What every benchmark needs, checked in seconds before minutes are spent on it (without DeepSpeed
# only the ZeRO-2 runs fail, so its absence is reported, not fatal).
step preflight 60 python3 -c "
import importlib.util, torch
assert torch.cuda.is_available(), 'torch finds no CUDA GPU'
import triton, pretrain.config, pretrain.engines.fsdp, pretrain.models
print({'gpu': torch.cuda.get_device_name(), 'memory_gib': torch.cuda.get_device_properties(0).total_memory / 2**30,
       'torch': torch.__version__, 'cuda': torch.version.cuda, 'triton': triton.__version__,
       'deepspeed': importlib.util.find_spec('deepspeed') is not None})"
if [[ $failed != 0 ]]; then
    tail -n 5 "$LOG" >&2
    exit "$failed"
fi

[[ $parts == *" tests "* ]] &&
    step gpu-tests 450 python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors
# 12 runs of about 15 s each, mostly process start, engine setup and first kernels (GPT2-Base's
# training FLOPs, 6 x 124M per token plus attention's, are 14 TFLOP per 16k-token step at 1k: about
# 40 ms at 40% of an H100's 989 TFLOP/s, so 35 steps take 1-4 s per run); no run starts after 180 s.
[[ $parts == *" engines "* ]] &&
    step engines 240 python3 tools/bench/engines.py --gpu --time-budget 180 --write-doc docs/benchmarks.md
if [[ $parts == *" attention "* ]]; then
    step attention 100 python3 tools/bench/attention.py --device cuda --tokens 1k 2k 4k 8k 16k \
        --positions 128 512 2k --max-case-seconds 20 --write-doc docs/benchmarks.md
    step document-mask 45 python3 tools/bench/attention.py --only document-mask --device cuda \
        --write-doc docs/benchmarks.md
fi
echo "== done: $failed step(s) failed; results in $OUT" | tee -a "$LOG" >&2
exit "$failed"
