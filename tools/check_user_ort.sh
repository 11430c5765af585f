#!/usr/bin/env bash
# Installing trt-latency into a venv with the user's own ONNX Runtime (e.g. the one onnxruntime-genai runs on)
# leaves that runtime as it was (issue 24.4): no second ONNX Runtime flavour laid over it, same version.
#
#   tools/check_user_ort.sh [VENV] [ORT_VERSION]     # defaults: /work/scratch/deps-venv, onnxruntime 1.30.0
#
# Not run by CI (it installs an ONNX Runtime from PyPI into a scratch venv, outside the repo). Exit 0 = unchanged.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-/work/scratch/deps-venv}"
ORT="${2:-1.30.0}"  # not the onnxruntime-gpu the `ort` extra would pick, so an overlay would show
rm -rf "$VENV"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "onnxruntime==$ORT"
before="$("$PY" -m pip list --format=freeze | grep -i '^onnxruntime' | sort)"
"$PY" -m pip install -q -e "$REPO"
after="$("$PY" -m pip list --format=freeze | grep -i '^onnxruntime' | sort)"
echo "before: $before"
echo "after:  $after"
loaded="$(cd /tmp && "$PY" -c 'import onnxruntime, trt_latency; print(onnxruntime.__version__, onnxruntime.__file__)')"
echo "imports: onnxruntime $loaded"
[ "$before" = "$after" ] || { echo "FAIL: the install changed the ONNX Runtime distributions"; exit 1; }
"$PY" -m pip list --format=freeze | grep -qi '^onnxruntime-gpu=' && { echo "FAIL: onnxruntime-gpu was installed"; exit 1; }
[ "${loaded%% *}" = "$ORT" ] || { echo "FAIL: onnxruntime ${loaded%% *} imports, not $ORT"; exit 1; }
(cd /tmp && "$PY" -c 'from trt_latency.engines.ort.runtime_info import ort_build; print("ort_build:", ort_build())')
echo "OK: onnxruntime $ORT untouched, no onnxruntime-gpu"
