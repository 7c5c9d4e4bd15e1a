#!/usr/bin/env bash
# Install lightning-sgl and its pinned stack into a virtual environment.
#
#   scripts/install.sh [VENV_DIR]      (default: .venv)
#
# CPU machines get the CPU builds: torch==2.13.0 (CPU) and fbgemm-gpu-cpu; torchrec is installed
# with --no-deps because it declares the CUDA `fbgemm-gpu` wheel and an old torchmetrics; its real
# runtime needs are installed by name. When `nvidia-smi` sees a GPU, the CUDA builds of torch and
# fbgemm-gpu are installed instead. Versions come from constraints.txt (the one place they live).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv}"
pins="$here/constraints.txt"
pin() { grep -E "^$1==" "$pins" | head -n1; }

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pipi() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[install] GPU found: CUDA builds of torch and fbgemm-gpu"
  fbgemm_version="$(pin fbgemm-gpu-cpu | cut -d= -f3)"
  pipi "$(pin torch)" "fbgemm-gpu==$fbgemm_version"
else
  echo "[install] no GPU: CPU builds of torch and fbgemm-gpu-cpu"
  pipi "$(pin torch)" "$(pin fbgemm-gpu-cpu)"
fi
pipi --no-deps "$(pin torchrec)"
pipi -c "$pins" tensordict pyre-extensions iopath tqdm lightning torchmetrics numpy scipy matplotlib \
  pytest hypothesis ruff "jsonargparse[signatures]" docstring-parser typeshed-client
pipi --no-deps --no-build-isolation -e "$here" 2>/dev/null || pipi --no-deps -e "$here"
"$py" - <<'PY'
import torch, fbgemm_gpu, torchrec, lightning
print(f"[install] torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec,'__version__') else '?'}, "
      f"lightning {lightning.__version__}")
PY
