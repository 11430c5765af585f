#!/usr/bin/env bash
# Regenerates every number the README quotes, on this machine, into runs/readme/ (about 25 minutes on 2 cores).
#   bash benchmarks/readme_numbers.sh
# Each step's full output is kept in runs/readme/*.txt / *.json; the README quotes them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/readme
mkdir -p "$out"
step() { echo "== $*" >&2; }

step "full calibrate on the embedded default (ort-cpu)"
rm -rf "$out/default"
{ time trt-latency calibrate --out "$out/default" --no-progress ; } > "$out/calibrate.txt" 2>&1

step "quick calibrate (the smoke run; also the loadtest's calibration)"
rm -rf "$out/quick"
{ time trt-latency calibrate --quick --out "$out/quick" --no-progress ; } > "$out/calibrate-quick.txt" 2>&1

step "analyze the default run's replay"
trt-latency analyze "$out/default/requests.csv" -c "$out/default/calibration.yaml" --plot "$out/default/analyze.png" \
  > "$out/analyze.txt"

step "compare the seed's estimator options on the default run's replay and on a seed-like trace"
trt-latency compare "$out/default/requests.csv" -c "$out/default/calibration.yaml" --alpha 0.05 \
  --plot "$out/default/compare.png" > "$out/compare.txt"
python benchmarks/seed_like_trace.py --out "$out/seed_like.csv" --first-step-ms -20 --t0 38 --t1 0.008 > "$out/seed_like.txt"
trt-latency compare "$out/seed_like.csv" --alpha 0.05 --plot "$out/seed_like_compare.png" >> "$out/seed_like.txt"

step "the seed's bucket table: which cause explains it"
trt-latency analyze --table benchmarks/seed_table.csv --plot "$out/seed_table.png" > "$out/seed_table.txt"

step "admission cost: Cython vs reference vs a bare Python call"
trt-latency bench -c "$out/default/calibration.yaml" > "$out/bench.txt"

step "harness overhead: sweep step vs a bare run_with_iobinding loop"
python benchmarks/bench_harness.py --rounds 300 > "$out/harness.txt"

step "serving loop: steady stream, then a +50% decode slowdown from request 300 (1000 requests each)"
trt-latency loadtest -c "$out/quick/calibration.yaml" --requests 1000 --alpha 0.05 --json > "$out/loadtest.json"
trt-latency loadtest -c "$out/quick/calibration.yaml" --requests 1000 --alpha 0.05 --slowdown-at 300 --slowdown-factor 1.5 \
  --json > "$out/loadtest-slowdown.json"
step "in-flight batching: the continuous-batching load test at overload, four policies, five runs"
python benchmarks/batch_loadtest.py -c "$out/quick/calibration.yaml" --runs 5 --requests 300 --max-batch 8 \
  --out "$out/batch_loadtest" > "$out/batch_loadtest.txt"
step "calibrate to a precision: five default calibrates (wall, LOPO), then adaptive vs fixed at equal time"
python benchmarks/adaptive_vs_fixed.py --runs 5 --skip-side-by-side > "$out/adaptive_runs.txt" 2>&1
python benchmarks/adaptive_vs_fixed.py --skip-calibrate --budget 10 > "$out/adaptive_vs_fixed.txt" 2>&1
step "where a CPU sweep's noise and bias come from: page backing, visit order"
python benchmarks/sweep_noise.py --rounds 80 --out "$out/sweep_noise" > "$out/sweep_noise.txt" 2>&1
step "this machine's noise floor and what the LOPO target would cost at it (issue 16)"
python benchmarks/noise_floor.py --out "$out/sweep_noise" --samples "$out/default/samples.csv" > "$out/noise_floor.txt" 2>&1
step "VLM: held-out TTFT with 1 and 2 images, two runs per encoder"
mkdir -p "$out/vlm"
for enc in qwen2.5-vl vit; do
  for run in 1 2; do
    python benchmarks/vlm_ttft.py --encoder "$enc" --reps 9 --out "$out/vlm/$enc-$run" > "$out/vlm/${enc%%.*}_run$run.txt" 2>&1
  done
done
step "done: $out"
