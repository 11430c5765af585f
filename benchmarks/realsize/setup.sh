#!/usr/bin/env bash
# Scratch venv for the real-size benchmark (never a dependency of the repo, never run by CI).
#
#   bash benchmarks/realsize/setup.sh [VENV]        (default /work/scratch/genai-venv)
#
# torch: the CPU wheel (PyPI's plain `torch` is the CUDA build); set TORCH_WHEEL or it takes the one in
# /opt/wheels. trt-latency goes in with --no-deps so that it never replaces genai's own onnxruntime: the
# calibration must time the ONNX Runtime that genai serves with.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
V=${1:-/work/scratch/genai-venv}
GENAI_VERSION=${GENAI_VERSION:-0.18.0}
TORCH=${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1)}
TORCH=${TORCH:-torch==2.13.0}

[ -x "$V/bin/python" ] || python3 -m venv "$V"
"$V/bin/pip" install -q --upgrade pip
"$V/bin/pip" install -q "$TORCH" transformers "onnxruntime-genai==$GENAI_VERSION" onnx onnxscript numpy
ORT_BEFORE=$("$V/bin/pip" list 2>/dev/null | grep -i '^onnxruntime ' || true)
# trt-latency without its onnxruntime-gpu dependency, then the light deps it imports
"$V/bin/pip" install -q "cython>=3" setuptools wheel
"$V/bin/pip" install -q pyyaml tqdm matplotlib
TRT_LATENCY_REQUIRE_EXT=1 "$V/bin/pip" install -q --no-deps --no-build-isolation -e "$REPO"
ORT_AFTER=$("$V/bin/pip" list 2>/dev/null | grep -i '^onnxruntime ' || true)
echo "onnxruntime before: $ORT_BEFORE  after: $ORT_AFTER"
[ "$ORT_BEFORE" = "$ORT_AFTER" ] || { echo "the install changed genai's onnxruntime" >&2; exit 1; }
"$V/bin/pip" list 2>/dev/null | grep -iE '^(torch|transformers|onnxruntime|onnxruntime-genai|onnx|numpy|trt-latency) ' || true
