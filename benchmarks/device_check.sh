#!/usr/bin/env bash
# The device check on a machine without a package registry: installs the carried pure-Python
# wheels (ml_collections) when it is missing, then runs `python -m benchmarks.device_check`.
#
#   benchmarks/device_check.sh [device_check args]      # from the repository root
#   WHEELS=DIR PYTHON=python3 benchmarks/device_check.sh --smoke
#
# Fill the wheels folder (ignored by git) where pip works:
#   python -m pip download --no-deps ml-collections==1.1.0 -d wheels/
# (absl-py and PyYAML, its needs, are on the GPU machine; add `absl-py==2.5.1 PyYAML==6.0.4`
# to that command for a machine that lacks them.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
if ! "$PYTHON" -c "import ml_collections, absl, yaml" 2>/dev/null; then
  site=${TMPDIR:-/tmp}/device_check_site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.device_check "$@"
