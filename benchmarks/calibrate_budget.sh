#!/usr/bin/env bash
# Does the default `trt-latency calibrate` hold its stated budget (configs/default.yaml
# sweep.adaptive.time_budget_s, +10%)? Runs it RUNS times into fresh folders, prints the wall time of the
# whole process (`time`, interpreter start-up included) next to the budget and the summary's own lines:
# where the time went, whether the budget held, what a larger one would buy.
# Usage: bash benchmarks/calibrate_budget.sh [RUNS] [extra calibrate flags, e.g. --time-budget 60]
# Run it on a quiet machine: on a loaded one every phase's floor (3 rounds per shape) costs more than priced.
set -euo pipefail
runs=${1:-1}
shift || true
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
quick=False
for a in "$@"; do [ "$a" = "--quick" ] && quick=True; done
budget=$(python -c "from trt_latency.engines.config import load_plan; print(load_plan(None, quick=$quick).sweep.adaptive.time_budget_s)")
for i in $(seq 1 "$runs"); do
  start=$(date +%s.%N)
  trt-latency calibrate --out "$out/run$i" --no-progress "$@" > "$out/run$i.log" 2>&1
  end=$(date +%s.%N)
  python - "$start" "$end" "$budget" "$out/run$i.log" <<'PY'
import sys
start, end, budget, log = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
wall = end - start
lines = open(log).read().splitlines()
tail = lines[next(i for i, l in enumerate(lines) if l.startswith("Where the time went")):]
print(f"wall {wall:.1f} s (process, start-up included) vs plan budget {budget:.0f} s: "
      f"{'within' if wall <= 1.1 * budget else 'OVER'} +10% ({wall / budget - 1:+.1%})")
print("\n".join(tail))
PY
done
