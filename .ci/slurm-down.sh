#!/usr/bin/env bash
# CI: cancel every job and stop the daemons that slurm-up.sh started (by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/slurm_cluster.sh down
