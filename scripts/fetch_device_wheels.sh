#!/usr/bin/env bash
# Fetch the wheels the lent GPU machine lacks (scripts/device_wheels.txt) for its Python 3.12 on x86_64 Linux into
# .whl/, here, where an index can be reached (the device reaches nothing). A package with no cp312 wheel on the index
# is built from its sdist with a Python 3.12 here ($PY312, else pyenv's; pycosat, a C extension reasoning-gym imports,
# is one). Then run the check with the folder carried:
#
#   bash scripts/fetch_device_wheels.sh     # -> .whl/*.whl, about 15 MB (the tree that travels holds 64 MiB)
#   device run: bash scripts/gpu_check.sh   with carry: [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
PY312="${PY312:-$(ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}"
mkdir -p .whl
grep -v '^\s*#' scripts/device_wheels.txt | grep -v '^\s*$' | while read -r req; do
    if ! "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d .whl "$req" 2>/dev/null; then
        [ -n "$PY312" ] || { echo "$req has no cp312 wheel and no Python 3.12 is here to build it (set PY312)"; exit 1; }
        echo "$req: no wheel for cp312 on the index; building it with $PY312"
        "$PY312" -m pip wheel -q --no-deps -w .whl "$req"
    fi
done
ls .whl/*.whl | wc -l | xargs echo "wheels in .whl/:"
du -sh .whl
