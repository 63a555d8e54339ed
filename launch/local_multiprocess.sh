#!/usr/bin/env bash
# Runs N JAX processes on this machine, talking over loopback (CPU collectives via gloo).
# Usage: bash launch/local_multiprocess.sh N CONFIG [extra flags...]
#   e.g. bash launch/local_multiprocess.sh 2 configs/vit.py:smoke --workdir=runs/mp
set -euo pipefail
n="${1:?number of processes}"; config="${2:?config}"; shift 2
port="${JDJAX_PORT:-$((20000 + RANDOM % 20000))}"
pids=()
for ((i = 0; i < n; i++)); do
  python -m jdjax.main --config="$config" "$@" \
    --config.distributed.initialize=True \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$n" \
    --config.distributed.process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
