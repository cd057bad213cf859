#!/usr/bin/env bash
# The Python 3.12 leg: set up a second venv (torch 2.14.1 + megatron-core 0.19.2, via the `cpu` extra's
# python_version markers) and run the test suite in it.
#   bash scripts/test_py312.sh [pytest args]
# Environment: IPT_PYTHON312 (default: python3.12 if it runs, else pyenv's newest 3.12), IPT_VENV312
# (default .venv-py312). IPT_OTHER_PYTHON (the 3.11 leg's python) turns on the cross-version checkpoint
# tests (tests/test_crossversion.py); .ci/run sets it.
# pip installs a CUDA build of torch here (about 3 GB of wheels, a 5.5 GB venv); it runs on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
find_python312() {
  if [ -n "${IPT_PYTHON312:-}" ]; then echo "$IPT_PYTHON312"; return; fi
  if command -v python3.12 >/dev/null && python3.12 -c '' 2>/dev/null; then command -v python3.12; return; fi
  local root candidate
  root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  for candidate in $(ls -d "$root"/versions/3.12* 2>/dev/null | sort -V -r); do
    if [ -x "$candidate/bin/python3.12" ]; then echo "$candidate/bin/python3.12"; return; fi
  done
  echo "no Python 3.12 found: set IPT_PYTHON312" >&2
  exit 2
}
IPT_PYTHON="$(find_python312)"
IPT_VENV="${IPT_VENV312:-.venv-py312}"
export IPT_PYTHON IPT_VENV
source scripts/setup_env.sh cpu,dev
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export IPT_SLURM="${IPT_SLURM:-0}"  # the tests on a real local Slurm cluster run in the first leg only
python -W ignore -c "import sys, torch; from megatron_ipt.training import mcore; print(f'py312 leg: Python {sys.version.split()[0]}, torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), megatron-core {mcore.version()}')"
python -m pytest "$@"
