#!/usr/bin/env bash
# The one prepared GPU run (issue 6). From the repo root on an H100/H200 host, after the onnxruntime-gpu
# parts are staged in /root/stage (see benchmarks/gpu/README.md):
#
#     bash benchmarks/gpu/run.sh
#
# 1. unpacks onnxruntime-gpu (. .gpu-ort/install.sh) and installs the project from what the host has
# 2. benchmarks/gpu/cuda_event_check.py: the shared CUDA layer's events vs torch's
# 3. trt-latency calibrate configs/gpu.yaml --backend ort-cuda   (export ~2 GB fp16, sweep, fit, replay)
# 4. benchmarks/gpu/independent_loop.py: the same model.onnx at three positions, no project code
# 5. the CUDA-layer tests (tests/test_trt_driver.py: driver/bindings check; tests/test_trt_cuda.py: pinned copies, graph upload,
#    capture fallback) right after step 2, and the TensorRT tests (tests/test_trt_engine.py,
#    tests/test_trt_backends.py: build + timing cache, decode/prefill profiles, warm-up, graphs vs ONNX
#    Runtime) at the end, when TensorRT is importable on the host (logged as SKIP otherwise)
#
# Results land in $OUT/<device-slug>/ (samples.csv, calibration.yaml, decode.png, requests.csv,
# summary.json, cuda_event_check.json, run.log, cuda-tests.xml, trt-tests.xml: small). The models (~2 GB) stay in $WORK, outside
# $OUT, so a rerun on the same warm machine resumes (export reused, swept rows kept).
# Every step runs under `timeout`, inside one overall budget (BUDGET_S, default 540 s).
# Environment: OUT (default ./gpu-out), WORK (default /tmp/trt-latency-gpu), BUDGET_S, QUICK=1 (--quick plan),
# REQUESTS=N (replay size; 0 skips the replay and its second session load), TRT_ONLY=1 (only install and the
# CUDA / TensorRT tests: skips calibrate and the independent loop),
# PYTHON (default python3). CPU smoke test of this script (tests/test_gpu_data.py): PROVIDER=cpu PLAN=tiny.yaml
# SKIP_INSTALL=1 runs the same steps on ONNX Runtime's CPU provider and skips the CUDA-only ones.
set -uo pipefail

OUT=${OUT:-$PWD/gpu-out}
WORK=${WORK:-/tmp/trt-latency-gpu}
BUDGET_S=${BUDGET_S:-540}
PY=${PYTHON:-python3}
PROVIDER=${PROVIDER:-cuda}
PLAN=${PLAN:-configs/gpu.yaml}
export PYTHONUNBUFFERED=1
T0=$SECONDS
FAILED=()
DISAGREE=0

log() { printf '[run.sh %4ds] %s\n' $((SECONDS - T0)) "$*"; }

# step NAME LIMIT_S CMD...: run CMD under timeout (never past the overall budget); record failures.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - (SECONDS - T0)))
  if ((left < 10)); then log "SKIP $name: overall budget of ${BUDGET_S}s spent"; FAILED+=("$name(skipped)"); return 1; fi
  ((limit > left)) && limit=$left
  log "START $name (limit ${limit}s): $*"
  local s=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if ((rc == 0)); then log "DONE  $name in $((SECONDS - s))s"
  else
    ((rc == 124 || rc == 137)) && log "TIMEOUT $name after $((SECONDS - s))s" || log "FAIL  $name rc=$rc after $((SECONDS - s))s"
    FAILED+=("$name")
  fi
  return $rc
}

# Device slug for the results folder: "NVIDIA H100 80GB HBM3" -> nvidia-h100-80gb-hbm3.
if [ "$PROVIDER" = cpu ]; then
  name="cpu-smoke-$(uname -m)"
else
  name=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -n1)
  [ -n "$name" ] || name=$(timeout 60 "$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)
  [ -n "$name" ] || { echo "run.sh: no GPU found (nvidia-smi and torch see none)" >&2; exit 2; }
fi
SLUG=$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9.]+/-/g; s/^-+//; s/-+$//')
DEST=$OUT/$SLUG
mkdir -p "$DEST" "$WORK"
exec > >(tee -a "$DEST/run.log") 2>&1
log "device '$name' -> $DEST ; work dir $WORK ; budget ${BUDGET_S}s"
[ "$PROVIDER" = cpu ] || timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true

# 1. onnxruntime-gpu, then the project.
if [ "$PROVIDER" = cpu ]; then
  log "PROVIDER=cpu: smoke run of this script on ONNX Runtime's CPU provider"
elif [ -f .gpu-ort/install.sh ]; then
  # Unpack under a time limit in a child shell, then source (instant once /tmp/ortgpu exists) for PYTHONPATH.
  step unpack-ort 120 bash -c '. .gpu-ort/install.sh' || { log "cannot unpack onnxruntime-gpu"; exit 3; }
  # shellcheck disable=SC1091
  . .gpu-ort/install.sh
else
  log "no .gpu-ort/install.sh: using whatever onnxruntime is importable (PYTHONPATH=${PYTHONPATH:-})"
fi
if [ "$PROVIDER" != cpu ]; then
  # CUDA 13 user-space libraries (cuBLAS, cuDNN, ...) from the host's nvidia-* / torch wheels, for ORT's CUDA EP.
  nvlibs=$(timeout 60 "$PY" -c '
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = {d for r in roots for d in glob.glob(os.path.join(r, "*", "lib")) + glob.glob(os.path.join(r, "*", "*", "lib"))}
try:
    import torch
    dirs.add(os.path.join(os.path.dirname(torch.__file__), "lib"))
except ImportError:
    pass
print(":".join(sorted(d for d in dirs if os.path.isdir(d))))' 2>/dev/null)
  [ -n "$nvlibs" ] && export LD_LIBRARY_PATH=$nvlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
# A real one-node session on the provider (listing it in get_available_providers proves nothing).
step check-ort 90 "$PY" -c '
import os, sys, tempfile
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
print("onnxruntime", ort.__version__, "from", ort.__file__)
print("available providers", ort.get_available_providers())
want = "CPUExecutionProvider" if sys.argv[1] == "cpu" else "CUDAExecutionProvider"
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
path = os.path.join(tempfile.mkdtemp(), "relu.onnx")
open(path, "wb").write(model.SerializeToString())
sess = ort.InferenceSession(path, providers=[want, "CPUExecutionProvider"])
print("session providers", sess.get_providers())
out = sess.run(None, {"x": np.array([[-1, 2], [3, -4]], dtype=np.float32)})[0]
ok = sess.get_providers()[0] == want and out.tolist() == [[0, 2], [3, 0]]
raise SystemExit(0 if ok else want + " does not run here")
' "$PROVIDER" || exit 3
if [ "${SKIP_INSTALL:-0}" = 1 ]; then log "SKIP install (SKIP_INSTALL=1)"
else step install 180 "$PY" -m pip install -q --no-build-isolation --no-deps -e . || exit 4
fi
step check-install 60 "$PY" -c 'import trt_latency, trt_latency.estimator.kernels as k; print("trt_latency", trt_latency.__version__, "kernels", k.__name__)' || exit 4

# 2. The shared CUDA layer's event timing against torch (short; first, so a long sweep cannot crowd it out).
if [ "$PROVIDER" = cpu ]; then log "SKIP cuda-event-check (PROVIDER=cpu)"
else step cuda-event-check 60 "$PY" benchmarks/gpu/cuda_event_check.py --out "$DEST"
fi

# pytest for the GPU test steps; addopts cleared (the host may lack pytest-benchmark's --benchmark-disable).
have_pytest=0
[ "$PROVIDER" != cpu ] && timeout 60 "$PY" -c 'import pytest' 2>/dev/null && have_pytest=1
gpu_tests() {  # gpu_tests NAME LIMIT FILES...: pytest with skip reasons shown (-rs), a junit report in $DEST
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" "$PY" -m pytest -q -rs -p no:cacheprovider -o addopts="" --junitxml "$DEST/$name.xml" "$@"
}
if [ "$PROVIDER" = cpu ]; then log "SKIP cuda-tests (PROVIDER=cpu)"
elif ((have_pytest)); then gpu_tests cuda-tests 90 tests/test_trt_driver.py tests/test_trt_cuda.py
else log "SKIP cuda-tests: pytest is not importable here"; FAILED+=("cuda-tests(skipped)")
fi

# 3. The calibration sweep on the CUDA provider.
if [ "${TRT_ONLY:-0}" = 1 ]; then log "SKIP calibrate and independent (TRT_ONLY=1)"; fi
quick=(); [ "${QUICK:-0}" = 1 ] && quick=(--quick)
[ -n "${REQUESTS:-}" ] && quick+=(--requests "$REQUESTS")  # REQUESTS=0: no replay (saves one session load)
[ "${TRT_ONLY:-0}" = 1 ] || step calibrate 330 "$PY" -m trt_latency calibrate "$PLAN" --backend "ort-$PROVIDER" --out "$WORK" --no-progress "${quick[@]}"
for f in samples.csv calibration.yaml decode.png requests.csv; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$DEST/"
done

# 4. The independent loop (needs calibrate's samples.csv and calibration.yaml).
if [ "${TRT_ONLY:-0}" = 1 ]; then :
elif [ -f "$WORK/calibration.yaml" ] && [ -f "$WORK/model.onnx" ]; then
  bw=(); [ "$PROVIDER" = cpu ] && bw=(--bandwidth-mib 64)
  # Exit 3 = it ran and the medians differ by more than 5%: a result to report, not a failed step.
  step independent 150 "$PY" benchmarks/gpu/independent_loop.py --run-dir "$WORK" --out "$DEST" \
    --provider "$PROVIDER" "${bw[@]}"
  case $? in
    0) ;;
    3) unset 'FAILED[-1]'; DISAGREE=1; log "RESULT: independent loop and sweep medians differ by > 5% (summary.json)";;
  esac
else
  log "SKIP independent: calibrate left no calibration.yaml / model.onnx in $WORK"; FAILED+=("independent(skipped)")
fi

# 5. The TensorRT backend's tests, when TensorRT (not only its stubs) is importable here.
if [ "$PROVIDER" = cpu ]; then log "SKIP trt-tests (PROVIDER=cpu)"
elif ! timeout 60 "$PY" -c 'import sys, tensorrt; print("tensorrt", tensorrt.__version__); sys.exit(0 if hasattr(tensorrt, "Builder") else 1)'; then
  log "SKIP trt-tests: TensorRT is not importable on this host (nothing of the TensorRT backend ran)"
elif ((have_pytest)); then
  TRT_LATENCY_CACHE=$WORK/trt-cache gpu_tests trt-tests 240 tests/test_trt_engine.py tests/test_trt_backends.py
else log "SKIP trt-tests: pytest is not importable here"; FAILED+=("trt-tests(skipped)")
fi

log "files in $DEST:"; ls -la "$DEST"
if ((${#FAILED[@]})); then log "FAILED steps: ${FAILED[*]}"; exit 1; fi
if ((DISAGREE)); then log "all steps ran in $((SECONDS - T0))s; the independent check DISAGREES (exit 5)"; exit 5; fi
log "all steps passed in $((SECONDS - T0))s"
