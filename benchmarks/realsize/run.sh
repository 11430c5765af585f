#!/usr/bin/env bash
# The real-size benchmark end to end (README: Real-size models). Never run by CI; minutes to an hour.
#
#   bash benchmarks/realsize/run.sh                 # 0.5B int4: setup, build, calibrate, 3 genai processes
#   SIZE=1.5b PRECISION=fp32 bash benchmarks/realsize/run.sh
#   REQUESTS=30 PROCESSES=3 OUT=/work/scratch/realsize bash benchmarks/realsize/run.sh
#
# Everything heavy lives outside the repo: the venv (VENV), the models (MODELS), the runs (OUT). The
# table lands in $OUT/<model>/results.md; copy it into benchmarks/realsize/results.md when it is the
# quiet-machine run the README quotes.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${VENV:-/work/scratch/genai-venv}
MODELS=${MODELS:-/work/scratch/models}
OUT=${OUT:-/work/scratch/realsize}
SIZE=${SIZE:-0.5b}
PRECISION=${PRECISION:-int4}
export HF_HUB_OFFLINE=1

[ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import onnxruntime_genai, trt_latency" 2>/dev/null \
  || bash "$HERE/setup.sh" "$VENV"
"$VENV/bin/python" "$HERE/make_models.py" --size "$SIZE" --precision "$PRECISION" --out "$MODELS"
MODEL="$MODELS/qwen2.5-$SIZE-$PRECISION"
"$VENV/bin/python" "$HERE/compare.py" "$MODEL" --out "$OUT/qwen2.5-$SIZE-$PRECISION" \
  --processes "${PROCESSES:-3}" --requests "${REQUESTS:-12}" ${COMPARE_ARGS:-}
# the same step on both backings, interleaved in one process
"$VENV/bin/python" "$HERE/backing_ab.py" "$MODEL/model.onnx" --positions 16,1024,4096 \
  --json "$OUT/qwen2.5-$SIZE-$PRECISION/backing_ab.json"
