#!/usr/bin/env bash
# The CUDA checks of issue 4 in one prepared run, for a session lent a GPU (the device tool runs
# it from the repository root and brings back what it writes under $OUT):
#
#   1. the machine: nvidia-smi, torch's view of the GPU;
#   2. the CUDA tests (the ones that skip without a GPU);
#   3. `gpt-oracle check` on the GPU in float32, TF32 and bf16 (parity against the float64 oracle);
#   4. `gpt-oracle bench --device cuda --configs 124M`: the tables, the error budget and issue 4's
#      MFU at 16 x 1024 (benchmarks/README.md), into $OUT/bench/, to be committed under
#      benchmarks/results/<its machine name>/.
#
# Each step's output goes to $OUT/<step>.log and a failed step does not stop the next; the exit
# status is the number of failed steps. Sized for the device tool's 10-minute command limit: set
# SKIP_BENCH=1 to leave out step 4 (the longest), or run it alone with ONLY_BENCH=1.
# Not yet run on a GPU: none has been lent to these sessions.
set -u
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
# The lent machines have torch (2.11 with CUDA), transformers, tiktoken, safetensors, hypothesis and
# pytest in their python3, and no network: the project runs from the working tree, not installed.
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME COMMAND...: run it, log it, count a failure
    local name="$1"; shift
    echo "== $name: $*" | tee -a "$OUT/steps.txt"
    local start=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s)" | tee -a "$OUT/steps.txt"
    else
        echo "   FAILED, status $? ($((SECONDS - start)) s); tail of $OUT/$name.log:" | tee -a "$OUT/steps.txt"
        tail -n 20 "$OUT/$name.log" | tee -a "$OUT/steps.txt"
        failed=$((failed + 1))
    fi
}

if [ "${ONLY_BENCH:-0}" != 1 ]; then
    step machine bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.is_available(), torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'"
    step cuda-tests env CI=true "$PY" -m pytest -q -p no:cacheprovider -rs -k "cuda or CUDA or tf32" parity_tests
    step check-cuda "$PY" -m gpt_oracle check --device cuda --dtype float32 --dtype tf32 --dtype bfloat16 \
        --json "$OUT/check-cuda.json"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    step bench-cuda "$PY" -m gpt_oracle bench --device cuda --configs 124M --out "$OUT/bench"
fi
echo "failed steps: $failed" | tee -a "$OUT/steps.txt"
exit "$failed"
