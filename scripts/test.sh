#!/usr/bin/env bash
# The tests: set up the environment (with test extras) and run pytest.
#   bash scripts/test.sh [pytest args, e.g. -m "not e2e"]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh cpu,dev,eval,launch,trackers
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest "$@"
