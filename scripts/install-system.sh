#!/usr/bin/env bash
# Install the system programs the tests need that pip cannot bring:
# - chromium (Debian's package): tests/evaluation/test_report.py opens RUN_DIR/report.html in it headless.
# Does nothing when they are already installed. Non-interactive; as root it runs apt-get itself,
# otherwise through sudo when sudo exists; else it says what to install and fails.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system.sh: chromium is missing and this machine has no apt-get;" \
       "install Chromium so that a 'chromium' command is on PATH, then run make again" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo -n)
else
  echo "install-system.sh: chromium is missing and installing it needs root;" \
       "run 'apt-get install -y chromium' as root (or install sudo), then run make again" >&2
  exit 1
fi
echo "installing chromium with apt-get (the report's browser test opens it headless)"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
command -v chromium >/dev/null 2>&1 || { echo "install-system.sh: apt-get ran but no 'chromium' is on PATH" >&2; exit 1; }
chromium --version
