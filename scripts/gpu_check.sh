#!/usr/bin/env bash
# CUDA checks on a bare torch + CUDA machine (no TorchRec/FBGEMM needed); see scripts/gpu_check.py.
#   scripts/gpu_check.sh [--dry-run] [--rows N ...]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
exec timeout 480 "$py" "$here/scripts/gpu_check.py" "$@"
