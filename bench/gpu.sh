#!/usr/bin/env bash
# The checks a GPU machine runs, in one go (no GPU here: CI and the CPU machines skip them):
# the CUDA tests (Triton kernels against the dense model with the pruned columns zeroed), then the
# speed bench on the card in bf16, dense vs pp vs flap, each compiled cold into an empty Inductor
# cache. Usage: bench/gpu.sh [OUT_DIR]  (JSON and logs there; default bench/results)
set -u
out=${1:-bench/results}
mkdir -p "$out"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
      torch.cuda.get_device_name())'
timeout 180 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda.py \
    tests/test_backend.py::test_cuda_call_never_synchronizes 2>&1 | tee "$out/gpu_tests.log"
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)  # cold compiles, then warm ones from this folder
timeout 300 python3 bench/speed.py --device cuda --dtype bfloat16 --model llama-2b-shaped \
    --shapes 16x1024 --methods dense,pp,flap --reps 10 --caches \
    --out "$out/speed_llama-2b-shaped_cuda_bfloat16.json" 2>&1 | tee "$out/gpu_speed.log"
