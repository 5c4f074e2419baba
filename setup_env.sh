#!/usr/bin/env bash
# Sourced by the entry scripts: create or reuse .venv and install requirements.txt when it changed.
# Sets PY to the environment's python.
set -euo pipefail
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_venv="${VENV:-$_here/.venv}"
if [ ! -x "$_venv/bin/python" ]; then
    echo "creating virtual environment in $_venv" >&2
    python3 -m venv "$_venv"
fi
_stamp="$_venv/.requirements.sha256"
_want="$(sha256sum "$_here/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$_stamp" 2>/dev/null || true)" != "$_want" ]; then
    echo "installing requirements.txt into $_venv (the first time takes a few minutes)" >&2
    "$_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$_here/requirements.txt" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
    "$_venv/bin/python" -c "import torch, torchvision, transformers, wandb, sklearn, tqdm, matplotlib, scipy, pytest, filelock, submitit" \
        || { echo "error: the requirements did not install (see pip's output above)" >&2; exit 1; }
    echo "$_want" > "$_stamp"
fi
PY="$_venv/bin/python"
export PY
