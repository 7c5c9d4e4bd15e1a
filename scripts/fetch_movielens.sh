#!/usr/bin/env bash
# Fetch MovieLens-100K (RecBole's atomic files, shipped in the RecBole 1.2.1 wheel on PyPI) into
# data/ml-100k. Never committed (data/ is ignored).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
python3 -m pip download --no-deps --disable-pip-version-check -q recbole==1.2.1 -d "$tmp"
mkdir -p "$here/data/ml-100k"
python3 - "$tmp" "$here/data/ml-100k" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "recbole-1.2.1-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("recbole/dataset_example/ml-100k/ml-100k.") and not name.endswith(".kg"):
            with open(os.path.join(sys.argv[2], os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
PY
rm -rf "$tmp"
echo "MovieLens-100K in $here/data/ml-100k"
