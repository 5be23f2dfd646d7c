#!/usr/bin/env bash
# The GPU suite where there is no package index (the lent GPU machines): install the wheels `make gpu-wheels` put
# in .whl/ into a temporary directory on PYTHONPATH, then run bench/gpu_suite.py with its results under
# OUT_ROOT/gpu-<device>-<date>/ and its log in OUT_ROOT/suite.log. Further arguments go to the suite.
#
#   bash bench/gpu_suite.sh "$OUT" [--minutes 8] [--parts kernels,throughput]
#   PYTHON=.venv/bin/python bash bench/gpu_suite.sh runs/gpu --smoke      # the same on this machine
set -euo pipefail
root=${1:?usage: bench/gpu_suite.sh OUT_ROOT [bench/gpu_suite.py options]}
shift
root=$(mkdir -p "$root" && cd "$root" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
wheels=${WHEELS:-.whl}  # WHEELS=none: use the packages installed here (the wheels are for the GPU image's Python)
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
else
    echo "gpu_suite.sh: no wheels in $wheels/ (make gpu-wheels); using the packages installed here" >&2
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" bench/gpu_suite.py --results-root "$root" "$@" 2>&1 | tee "$root/suite.log"
