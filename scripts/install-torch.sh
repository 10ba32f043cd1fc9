#!/usr/bin/env bash
# Install the right PyTorch build into the given Python's environment:
# - a machine with an NVIDIA GPU gets the normal (CUDA) build from PyPI;
# - a machine without one gets the CPU build (~200 MB instead of several GB):
#   first from a local wheel if pip can find one offline, else from PyTorch's CPU index.
# Does nothing when a torch of the pinned version is already installed.
set -euo pipefail
PY=${1:-python3}
VERSION=${TORCH_VERSION:-2.13.0}
if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$VERSION' else 1)" 2>/dev/null; then
  exit 0
fi
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing torch==$VERSION (CUDA build)"
  pip_install "torch==$VERSION"
else
  echo "no NVIDIA GPU: installing the CPU build of torch==$VERSION"
  # A CPU wheel that pip can find offline (a local wheel folder in pip's config):
  # take it alone, then let the next step bring its pure-Python dependencies.
  if pip_install --no-index --no-deps "torch==$VERSION" 2>/dev/null && \
     "$PY" -c "import importlib.metadata as m, sys; v = m.version('torch'); sys.exit(0 if '+' not in v or 'cpu' in v else 1)"; then
    pip_install "torch==$VERSION"
  else
    pip_install "torch==$VERSION+cpu" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi
"$PY" -c "import importlib.metadata as m; print('torch', m.version('torch'))"
