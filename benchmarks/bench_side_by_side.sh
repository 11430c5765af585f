#!/usr/bin/env bash
# Hot path before/after, side by side in one session: `trt-latency bench --json` of two trees, alternated.
# Usage: benchmarks/bench_side_by_side.sh CALIBRATION BASE_PKG [ROUNDS]
#   BASE_PKG: a folder holding an installed-layout trt_latency/ of the baseline (its engines/, estimator/,
#   serving/, ext/, configs/ linked in, extensions built), put first on PYTHONPATH; "after" is the active install.
set -euo pipefail
cd /tmp  # never the repo root: its trt_latency/ folder would shadow both installs
cal=$1; base=$2; rounds=${3:-3}
for i in $(seq "$rounds"); do
  for side in before after; do
    if [ "$side" = before ]; then pp=$base; else pp=; fi
    PYTHONPATH=$pp python -m trt_latency.cli bench -c "$cal" --json |
      python -c "import json,sys; d=json.load(sys.stdin); print('$side', json.dumps({k: v for k, v in d.items() if 'ns' in k or k == 'kernels'}))"
  done
done
