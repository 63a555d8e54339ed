#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU VM pod slice.
# Usage: bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG [extra flags...]
# Assumes the repository is checked out at ~/jdjax on every worker, and a workdir on shared
# storage (e.g. a gs:// bucket) passed as --workdir so all hosts write one checkpoint.
set -euo pipefail
tpu="${1:?TPU name}"; zone="${2:?zone}"; config="${3:?config}"; shift 3
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command "
  cd ~/jdjax && pip install -q -e '.[gcs]' 'jax[tpu]' &&
  JDJAX_DISTRIBUTED=1 python -m jdjax.main --config=$config $*"
