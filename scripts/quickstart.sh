#!/usr/bin/env bash
# The quickstart: set up the environment and run the whole pipeline on CPU.
#   bash scripts/quickstart.sh [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh cpu
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
time ipt run examples/quickstart.yaml "$@"
