#!/usr/bin/env bash
# CI: install Debian's SLURM + accounting packages if missing and start the single-node
# cluster. Prints the `export SLURM_CONF=...` line (also in $TDA_SLURM_DIR/env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/slurm_cluster.sh install
scripts/slurm_cluster.sh up
