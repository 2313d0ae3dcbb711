#!/usr/bin/env bash
# One lent-GPU session in one script (about 12 minutes on an H100 / H200): what a CPU cannot tell.
#
#   1. the Triton and flex kernels compiled and run on the GPU against the eager reference (the kernel tests
#      with the interpreter off), and attnctl's `auto` choosing a kernel that runs there;
#   2. the kernel table (benchmarks/bench_kernels.py) and the end-to-end table on real-size denoisers
#      (benchmarks/gpu_e2e.py: SD 1.5 and Flux-dev by default), ratios to stock measured side by side, with the
#      targets of issues #15-#17 printed as PASS / FAIL.
#
# Offline machine without diffusers: download the wheels here first (see the project guide), then
#   run: bash benchmarks/gpu_session.sh   (carry .whl; results under $OUT, or ./gpu-results)
# Each part has its own time limit, so that one slow part cannot take the others' time. Override with
# ATTNCTL_GPU_MODELS (e.g. "sdxl"), ATTNCTL_GPU_VARIANTS, ATTNCTL_GPU_LIMIT (seconds per part).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
limit="${ATTNCTL_GPU_LIMIT:-200}"
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)" >> "$out/gpu.txt" 2>&1

part() {  # name, command...
    local name="$1"; shift
    local t0; t0=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "$name: rc $? in $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
}

part kernel-tests python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels_labels.py \
    tests/test_kernels_flex.py tests/test_kernels_fallback.py tests/test_kernels_e2e.py
part bench-kernels python3 benchmarks/bench_kernels.py --repeats 5
models="${ATTNCTL_GPU_MODELS:-sd15,flux}"
variants="${ATTNCTL_GPU_VARIANTS:-}"
for model in ${models//,/ }; do
    part "e2e-$model" python3 benchmarks/gpu_e2e.py --models "$model" ${variants:+--variants "$variants"} --json "$out/e2e-$model.json"
done
cat "$out/summary.txt"
