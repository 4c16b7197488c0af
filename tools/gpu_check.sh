#!/usr/bin/env bash
# The GPU check, in one command, in about 7 minutes, without network (prepare the wheels and
# mosquitto with tools/gpu_prepare.sh and carry .whl/ and .mosq/):
#   the CUDA tests and the streaming tests on the GPU machine's torch; bf16 against fp32;
#   whole-window throughput through Predictor; the worker alone at 1 to 10,000 subjects;
#   windowers and worker together; a training step on the CPU and CUDA; latency over LSL
#   and MQTT with the model on CUDA.
# Figures go to stdout and to the folder given (default $OUT) for docs/benchmarks.md.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
export LSLAPICFG=$PWD/tools/lsl_api.cfg PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
[ -d .mosq ] && export PATH=$PWD/.mosq:$PATH
step() { echo; echo "== $1 ($(date -u +%T))"; shift; "$@"; echo "(exit $?)"; }
{
  if [ -d .whl ]; then
    step "wheels" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
  fi
  step "machine" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  step "torch" python3 -c "import torch, os; print(torch.__version__, torch.cuda.get_device_name(), os.cpu_count(), 'CPUs')"
  step "CUDA and streaming tests" timeout 110 python3 -m pytest -q -s -p no:cacheprovider \
    tests/test_cuda.py tests/test_streaming.py
  step "bf16 vs fp32" timeout 30 python3 tools/bench_scale.py --check --device cuda
  step "whole windows" timeout 30 python3 tools/bench_scale.py --whole --device cuda
  step "worker alone" timeout 80 python3 tools/bench_scale.py --worker-only --device cuda \
    --subjects 1 100 1000 10000 --hops 12 --json "$out/worker.json"
  step "windowers + worker" timeout 50 python3 tools/bench_scale.py --device cuda \
    --subjects 100 200 400 --hops 15 --precision bf16 --json "$out/scale.json"
  step "training steps" timeout 60 python3 tools/bench_train.py --seconds 3 --json "$out/train.json"
  step "latency" timeout 130 python3 tools/bench_latency.py --seconds 10 --device cuda \
    --json "$out/latency.json"
} 2>&1 | tee "$out/gpu-check.log"
