#!/usr/bin/env bash
# The GPU check, in one command, under 8 minutes, without network (prepare the wheels and
# mosquitto with tools/gpu_prepare.sh and carry .whl/ and .mosq/):
#   the CUDA tests and the streaming tests on the GPU machine's torch; bf16 against fp32;
#   whole-window throughput through Predictor; the worker alone at 1 to 10,000 subjects;
#   windowers and worker together; latency over LSL and MQTT with the model on CUDA.
# Figures go to stdout and to $OUT (or the folder given) for docs/benchmarks.md.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
export LSLAPICFG=$PWD/tools/lsl_api.cfg PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ -d .mosq ]; then
  export PATH=$PWD/.mosq:$PATH LD_LIBRARY_PATH=$PWD/.mosq/lib:${LD_LIBRARY_PATH:-}
fi
step() { echo; echo "== $1"; shift; "$@"; echo "(exit $?)"; }
{
  date -u
  step "machine" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  step "torch" python3 -c "import torch, os; print(torch.__version__, torch.cuda.get_device_name(), os.cpu_count(), 'CPUs')"
  step "CUDA and streaming tests" timeout 170 python3 -m pytest -q -s -p no:cacheprovider \
    tests/test_cuda.py tests/test_streaming.py
  step "bf16 vs fp32" timeout 40 python3 tools/bench_scale.py --check --device cuda
  step "whole windows" timeout 60 python3 tools/bench_scale.py --whole --device cuda
  step "worker alone" timeout 100 python3 tools/bench_scale.py --worker-only --device cuda \
    --subjects 1 100 1000 10000 --hops 15 --json "$out/worker.json"
  step "windowers + worker" timeout 60 python3 tools/bench_scale.py --device cuda \
    --subjects 100 200 400 --hops 20 --precision bf16 --json "$out/scale.json"
  step "latency" timeout 150 python3 tools/bench_latency.py --seconds 20 --device cuda \
    --json "$out/latency.json"
} 2>&1 | tee "$out/gpu-check.log"
