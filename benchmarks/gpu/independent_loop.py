"""Independent check of a `trt-latency calibrate` run: the same model.onnx, timed with NO project code.

A plain ONNX Runtime loop (its own session, its own OrtValues on the device, its own IOBinding, its
own timing) times one decode step at three positions of the sweep, and the HBM bandwidth is measured
with a device-to-device copy (torch, else CuPy). summary.json then sets, side by side:

- the independent loop's median step time vs the sweep's median (samples.csv) at each of the three
  positions, with a flag for agreement within 5%;
- the fitted slope in ns per KV token (calibration.yaml) vs the roofline slope: KV bytes per token
  divided by the measured bandwidth;
- the fit's leave-one-position-out error (calibration.yaml).

Timing: wall time of ``run_with_iobinding`` followed by ``IOBinding.synchronize_outputs()`` (ONNX
Runtime already waits for the CUDA stream at the end of Run by default; the extra synchronize makes
the wall time valid even if it did not). On CUDA with torch present, ONNX Runtime is also given a
torch stream (CUDA EP option ``user_compute_stream``) and CUDA events recorded on that stream
bracket each run: GPU time, reported beside the wall time.

Only numpy, yaml, onnxruntime (and torch / CuPy on a GPU) are imported: the check must not share a
bug with the code it checks. ``--provider cpu`` runs the same path on the CPU provider (smoke test).

    python benchmarks/gpu/independent_loop.py --run-dir DIR [--model DIR/model.onnx] [--out DIR]
    python benchmarks/gpu/independent_loop.py --show benchmarks/gpu/<device>/summary.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

AGREEMENT_TOLERANCE = 0.05
SUMMARY_NAME = "summary.json"

# ------------------------------------------------------------------------------------------ pure helpers


def read_calibration(path: str | os.PathLike[str]) -> dict[str, Any]:
    """calibration.yaml as plain data (yaml.safe_load: no project code)."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("configs"), list) or not data["configs"]:
        raise SystemExit(f"{path}: not a calibration file (no configs list)")
    return data


def primary_config(cal: Mapping[str, Any]) -> dict[str, Any]:
    """The first config of the calibration (the plan's primary: the one written as model.onnx)."""
    cfg = cal["configs"][0]
    return dict(cfg)


def read_decode_samples(path: str | os.PathLike[str], key: tuple[int, int, int]) -> dict[int, list[float]]:
    """{past_len: [latency_ms, ...]} of the decode rows (new_tokens 1, batch <= 1) of config ``key``."""
    out: dict[int, list[float]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row.get("phase") != "decode" or int(row["new_tokens"]) != 1 or int(row.get("batch") or 1) > 1:
                continue
            if (int(row.get("tier_idx") or 0), int(row.get("top_k") or 0),
                    int(row.get("num_active_blocks") or 0)) != key:
                continue
            out.setdefault(int(row["past_len"]), []).append(float(row["latency_ms"]))
    return out


def medians(samples: Mapping[int, Sequence[float]]) -> dict[int, float]:
    return {p: float(np.median(np.asarray(v, dtype=np.float64))) for p, v in sorted(samples.items())}


def pick_positions(positions: Sequence[int]) -> list[int]:
    """Three positions of the sweep: the smallest, the one nearest half the largest, the largest."""
    pos = sorted(set(int(p) for p in positions))
    if len(pos) < 3:
        raise ValueError(f"need >= 3 swept decode positions, got {pos}")
    lo, hi = pos[0], pos[-1]
    mid = min(pos[1:-1], key=lambda p: (abs(p - hi / 2), p))
    return [lo, mid, hi]


def fitted_slopes_ns_per_token(knots: Sequence[float], values_ms: Sequence[float]) -> dict[str, float]:
    """Slopes of the fitted piecewise-linear T(L) in ns per KV token: overall (first to last knot) and
    of its last segment (long context, where reading the KV cache dominates the step)."""
    k = np.asarray(knots, dtype=np.float64)
    v = np.asarray(values_ms, dtype=np.float64)
    if k.size < 2:
        raise ValueError("a fitted curve needs >= 2 knots")
    return {"overall": float((v[-1] - v[0]) / (k[-1] - k[0]) * 1e6),
            "last_segment": float((v[-1] - v[-2]) / (k[-1] - k[-2]) * 1e6)}


def median_slope_ns_per_token(sweep_medians: Mapping[int, float], min_past_len: int) -> float | None:
    """Least-squares slope of the measured medians at past_len >= min_past_len (ns per token)."""
    pts = [(p, m) for p, m in sweep_medians.items() if p >= min_past_len]
    if len(pts) < 2:
        return None
    x = np.array([p for p, _ in pts], dtype=np.float64)
    y = np.array([m for _, m in pts], dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0] * 1e6)


def roofline_slope_ns_per_token(kv_bytes_per_token: int, bandwidth_gbps: float) -> float:
    """Time to read one token's K and V once at the measured bandwidth: bytes / (GB/s) = ns."""
    if bandwidth_gbps <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth_gbps}")
    return float(kv_bytes_per_token) / float(bandwidth_gbps)


def compare_positions(independent: Mapping[int, Mapping[str, Any]], sweep: Mapping[int, Sequence[float]],
                      tolerance: float = AGREEMENT_TOLERANCE) -> list[dict[str, Any]]:
    """Per position: independent wall median vs sweep median, relative difference, agreement flag."""
    rows = []
    for p in sorted(independent):
        ind = independent[p]
        if p not in sweep:
            raise ValueError(f"position {p} is not in the sweep's samples")
        sweep_med = float(np.median(np.asarray(sweep[p], dtype=np.float64)))
        wall = float(ind["wall_median_ms"])
        rel = (wall - sweep_med) / sweep_med
        rows.append({
            "past_len": int(p),
            "independent_wall_median_ms": wall,
            "independent_event_median_ms": ind.get("event_median_ms"),
            "independent_reps": int(ind["reps"]),
            "sweep_median_ms": sweep_med,
            "sweep_reps": len(sweep[p]),
            "relative_difference": float(rel),
            "agree": bool(abs(rel) <= tolerance),
        })
    return rows


def build_summary(*, device_name: str, provider: str, independent: Mapping[int, Mapping[str, Any]],
                  sweep: Mapping[int, Sequence[float]], calibration: Mapping[str, Any], bandwidth_gbps: float,
                  bandwidth_method: str, extra: Mapping[str, Any] | None = None,
                  tolerance: float = AGREEMENT_TOLERANCE) -> dict[str, Any]:
    """summary.json content from the measurements and the run's samples / calibration."""
    cfg = primary_config(calibration)
    kv_bytes = cfg.get("kv_bytes_per_token")
    if not kv_bytes:
        raise ValueError("calibration.yaml has no kv_bytes_per_token for the primary config")
    positions = compare_positions(independent, sweep, tolerance)
    slopes = fitted_slopes_ns_per_token(cfg["decode_knots"], cfg["decode_values_ms"])
    roof = roofline_slope_ns_per_token(int(kv_bytes), bandwidth_gbps)
    sweep_med = medians(sweep)
    top = max(sweep_med) if sweep_med else 0
    err = cfg.get("fit_error") or {}
    prov = calibration.get("provenance") or {}
    return {
        "device_name": device_name,
        "provider": provider,
        "config": {"tier_idx": cfg["tier_idx"], "top_k": cfg["top_k"],
                   "num_active_blocks": cfg["num_active_blocks"]},
        "calibration_backend": prov.get("backend"),
        "calibration_device": prov.get("device"),
        "tolerance": tolerance,
        "positions": positions,
        "all_agree": all(r["agree"] for r in positions),
        "slope": {
            "fitted_ns_per_token": slopes["overall"],
            "fitted_last_segment_ns_per_token": slopes["last_segment"],
            "measured_medians_ns_per_token": median_slope_ns_per_token(sweep_med, top // 8 if top else 0),
            "kv_bytes_per_token": int(kv_bytes),
            "bandwidth_gbps": float(bandwidth_gbps),
            "bandwidth_method": bandwidth_method,
            "roofline_ns_per_token": roof,
            "fitted_over_roofline": slopes["overall"] / roof,
        },
        "fit_error": {
            "loo_median_rel": err.get("loo_median_rel"),
            "loo_max_rel": err.get("loo_max_rel"),
            "n_positions": err.get("n_positions"),
        },
        **(dict(extra) if extra else {}),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = [f"device {summary['device_name']} ({summary['provider']})",
             f"  {'past_len':>8}  {'independent ms':>14}  {'events ms':>9}  {'sweep ms':>9}  {'diff':>7}  agree"]
    for r in summary["positions"]:
        ev = r["independent_event_median_ms"]
        lines.append(f"  {r['past_len']:>8}  {r['independent_wall_median_ms']:>14.4f}  "
                     f"{'-' if ev is None else format(ev, '.4f'):>9}  {r['sweep_median_ms']:>9.4f}  "
                     f"{r['relative_difference']:>+7.1%}  {'yes' if r['agree'] else 'NO'}")
    s, e = summary["slope"], summary["fit_error"]
    lines.append(f"  slope: fitted {s['fitted_ns_per_token']:.3f} ns/token (last segment "
                 f"{s['fitted_last_segment_ns_per_token']:.3f}), roofline {s['roofline_ns_per_token']:.3f} ns/token "
                 f"= {s['kv_bytes_per_token']} B / {s['bandwidth_gbps']:.0f} GB/s ({s['bandwidth_method']}); "
                 f"ratio {s['fitted_over_roofline']:.2f}")
    if e.get("loo_median_rel") is not None:
        lines.append(f"  fit leave-one-position-out error: median {e['loo_median_rel']:.2%}, "
                     f"max {e['loo_max_rel']:.2%} over {e['n_positions']} positions")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ measuring


def _np_type(ort_type: str) -> type[np.generic]:
    table: dict[str, type[np.generic]] = {"tensor(float16)": np.float16, "tensor(float)": np.float32,
                                          "tensor(int64)": np.int64}
    if ort_type not in table:
        raise SystemExit(f"unsupported input type {ort_type}")
    return table[ort_type]


class DecodeModel:
    """What the loop needs about the decoder, read through ONNX Runtime's own session API."""

    def __init__(self, sess: Any) -> None:
        inputs = {i.name: i for i in sess.get_inputs()}
        outputs = {o.name: o for o in sess.get_outputs()}
        meta = sess.get_modelmeta().custom_metadata_map

        def dim(value: Any, meta_key: str) -> int:
            if isinstance(value, int) and value > 0:
                return value
            return int(meta["trt_latency." + meta_key])

        self.kv_names = sorted((n for n in inputs if n.startswith("past_key_values.")),
                               key=lambda n: (int(n.split(".")[1]), n))
        if not self.kv_names or "inputs_embeds" not in inputs or "position_ids" not in inputs:
            raise SystemExit(f"not a decoder with explicit KV inputs: {sorted(inputs)}")
        kv0 = inputs[self.kv_names[0]]
        self.kv_heads = dim(kv0.shape[1], "kv_heads")
        self.head_dim = dim(kv0.shape[3], "head_dim")
        self.hidden = dim(inputs["inputs_embeds"].shape[2], "hidden")
        self.vocab = dim(outputs["logits"].shape[2], "vocab")
        self.dtype = _np_type(inputs["inputs_embeds"].type)
        self.kv_dtype = _np_type(kv0.type)
        self.present = {n: "present." + n[len("past_key_values."):] for n in self.kv_names}
        self.output_names = list(outputs)


def open_session(model: Path, provider: str, device_id: int, stream_ptr: int | None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if provider == "cpu":
        so.intra_op_num_threads = 1
        providers: list[Any] = ["CPUExecutionProvider"]
    else:
        opts = {"device_id": str(device_id)}
        if stream_ptr:
            opts["user_compute_stream"] = str(stream_ptr)  # implies has_user_compute_stream
        providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
    sess = ort.InferenceSession(str(model), so, providers=providers)
    want = "CPUExecutionProvider" if provider == "cpu" else "CUDAExecutionProvider"
    if sess.get_providers()[0] != want:
        raise SystemExit(f"ONNX Runtime gave {sess.get_providers()} instead of {want}")
    return sess


def bind_position(sess: Any, m: DecodeModel, past_len: int, device: str, device_id: int,
                  rng: np.random.Generator) -> tuple[Any, list[Any]]:
    """One IOBinding for a decode step at ``past_len``: every input and output an OrtValue on ``device``."""
    import onnxruntime as ort

    ov = ort.OrtValue
    keep: list[Any] = []  # the OrtValues must outlive the binding
    b = sess.io_binding()

    def bind_in(name: str, host: np.ndarray) -> None:
        value = ov.ortvalue_from_numpy(host, device, device_id)
        keep.append(value)
        b.bind_ortvalue_input(name, value)

    def bind_out(name: str, shape: list[int], dtype: type[np.generic]) -> None:
        value = ov.ortvalue_from_shape_and_type(shape, dtype, device, device_id)
        keep.append(value)
        b.bind_ortvalue_output(name, value)

    bind_in("inputs_embeds", (rng.standard_normal((1, 1, m.hidden)) * 0.1).astype(m.dtype))
    bind_in("position_ids", np.full((1, 1), past_len, dtype=np.int64))
    # Small finite KV values (contents do not change the work); one host array serves every block.
    host_kv = np.full((1, m.kv_heads, past_len, m.head_dim), 0.01, dtype=m.kv_dtype)
    for name in m.kv_names:
        bind_in(name, host_kv)
        bind_out(m.present[name], [1, m.kv_heads, past_len + 1, m.head_dim], m.kv_dtype)
    bind_out("logits", [1, 1, m.vocab], m.dtype)
    return b, keep


def time_positions(sess: Any, m: DecodeModel, positions: Sequence[int], *, reps: int, warmup: int, device: str,
                   device_id: int, torch_stream: Any = None, seed: int = 0) -> dict[int, dict[str, Any]]:
    """Rounds over the positions in a shuffled order; per visit ``warmup`` untimed runs and one timed run."""
    rng = np.random.default_rng(seed)
    bound = {p: bind_position(sess, m, p, device, device_id, rng) for p in positions}
    wall: dict[int, list[float]] = {p: [] for p in positions}
    events: dict[int, list[tuple[Any, Any]]] = {p: [] for p in positions}
    use_events = torch_stream is not None
    if use_events:
        import torch
    clock = time.perf_counter_ns
    for _ in range(reps):
        for i in rng.permutation(len(positions)):
            p = positions[int(i)]
            binding = bound[p][0]
            for _ in range(warmup):
                sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
            if use_events:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(torch_stream)
            t0 = clock()
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
            t1 = clock()
            if use_events:
                end.record(torch_stream)
                events[p].append((start, end))
            wall[p].append((t1 - t0) * 1e-6)
    if use_events:
        torch.cuda.synchronize()
    out: dict[int, dict[str, Any]] = {}
    for p in positions:
        ev = [float(s.elapsed_time(e)) for s, e in events[p]]
        out[p] = {"wall_median_ms": float(np.median(wall[p])), "wall_ms": wall[p], "reps": len(wall[p]),
                  "event_median_ms": float(np.median(ev)) if ev else None, "event_ms": ev or None}
    return out


def measure_bandwidth(provider: str, nbytes: int, reps: int = 10) -> tuple[float, str]:
    """Device-to-device copy bandwidth in GB/s, counting read + write (2 * nbytes per copy)."""
    if provider == "cpu":
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            times.append(time.perf_counter() - t0)
        return 2.0 * nbytes / float(np.median(times[1:])) / 1e9, "host copy (numpy.copyto)"
    try:
        import torch

        if torch.cuda.is_available():
            a = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
            b = torch.empty_like(a)
            b.copy_(a)
            torch.cuda.synchronize()
            ms = []
            for _ in range(reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                b.copy_(a)
                e.record()
                e.synchronize()
                ms.append(s.elapsed_time(e))
            del a, b
            return 2.0 * nbytes / (float(np.median(ms)) * 1e-3) / 1e9, "device-to-device copy (torch, CUDA events)"
    except ImportError:
        pass
    import cupy

    a = cupy.ones(nbytes, dtype=cupy.uint8)
    b = cupy.empty_like(a)
    b[...] = a
    cupy.cuda.Device().synchronize()
    ms = []
    for _ in range(reps):
        s, e = cupy.cuda.Event(), cupy.cuda.Event()
        s.record()
        b[...] = a
        e.record()
        e.synchronize()
        ms.append(cupy.cuda.get_elapsed_time(s, e))
    return 2.0 * nbytes / (float(np.median(ms)) * 1e-3) / 1e9, "device-to-device copy (CuPy, CUDA events)"


def device_name(provider: str, device_id: int) -> str:
    if provider == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    try:
        import torch

        return str(torch.cuda.get_device_name(device_id))
    except ImportError:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)


def _versions() -> dict[str, str]:
    import onnxruntime as ort

    out = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__,
           "onnxruntime_path": str(Path(ort.__file__).parent)}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="calibrate output: samples.csv, calibration.yaml (required unless --show)")
    parser.add_argument("--show", metavar="SUMMARY", help="print the table of an existing summary.json and exit")
    parser.add_argument("--model", help="the model to time (default RUN_DIR/model.onnx)")
    parser.add_argument("--out", help=f"folder for {SUMMARY_NAME} (default RUN_DIR)")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--reps", type=int, default=30, help="timed runs per position (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each timed run (default 2)")
    parser.add_argument("--positions", type=int, nargs=3, metavar="P",
                        help="three past lengths (default: smallest, middle, largest of the sweep)")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="bytes per bandwidth copy, MiB")
    parser.add_argument("--no-events", action="store_true", help="wall time only (no torch stream / events)")
    args = parser.parse_args(argv)
    if args.show:
        print(format_summary(json.loads(Path(args.show).read_text())))
        return 0
    if not args.run_dir:
        parser.error("--run-dir is required")

    run_dir = Path(args.run_dir)
    model = Path(args.model) if args.model else run_dir / "model.onnx"
    out = Path(args.out) if args.out else run_dir
    cal = read_calibration(run_dir / "calibration.yaml")
    cfg = primary_config(cal)
    key = (int(cfg["tier_idx"]), int(cfg["top_k"]), int(cfg["num_active_blocks"]))
    sweep = read_decode_samples(run_dir / "samples.csv", key)
    positions = list(args.positions) if args.positions else pick_positions(list(sweep))

    device = "cpu" if args.provider == "cpu" else "cuda"
    torch_stream = None
    if device == "cuda" and not args.no_events:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.set_device(args.device_id)
                # A non-default stream: ONNX Runtime treats a 0 (legacy default) stream handle as unset.
                torch_stream = torch.cuda.Stream()
        except ImportError:
            torch_stream = None
    started = time.perf_counter()
    print(f"independent loop: {model} on {args.provider}, positions {positions}, {args.reps} reps x "
          f"(1 + {args.warmup} warm-up)", flush=True)
    sess = open_session(model, args.provider, args.device_id,
                        int(torch_stream.cuda_stream) if torch_stream is not None else None)
    m = DecodeModel(sess)
    loaded = time.perf_counter()
    print(f"  session loaded in {loaded - started:.1f} s", flush=True)
    independent = time_positions(sess, m, positions, reps=args.reps, warmup=args.warmup, device=device,
                                 device_id=args.device_id, torch_stream=torch_stream)
    del sess
    gbps, method = measure_bandwidth(args.provider, args.bandwidth_mib << 20)
    summary = build_summary(
        device_name=device_name(args.provider, args.device_id), provider=args.provider, independent=independent,
        sweep=sweep, calibration=cal, bandwidth_gbps=gbps, bandwidth_method=method,
        extra={"independent_samples_ms": {str(p): v["wall_ms"] for p, v in independent.items()},
               "independent_event_samples_ms": {str(p): v["event_ms"] for p, v in independent.items()},
               "timing": "wall: run_with_iobinding + IOBinding.synchronize_outputs(); events: torch.cuda.Event on "
                         "the stream given to the CUDA EP as user_compute_stream",
               "warmup_per_timed_run": args.warmup, "model": str(model),
               "versions": _versions(), "seconds": {"session_load": loaded - started,
                                                    "total": time.perf_counter() - started},
               "unix_time": time.time()})
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"wrote {out / SUMMARY_NAME}")
    return 0 if summary["all_agree"] else 3


if __name__ == "__main__":
    sys.exit(main())
