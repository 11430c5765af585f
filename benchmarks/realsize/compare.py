"""Default calibrate vs onnxruntime-genai's own Generator, side by side, on a real-size model.

    python benchmarks/realsize/compare.py /work/scratch/models/qwen2.5-0.5b-int4 --out /work/scratch/realsize/int4

Run in the scratch venv of setup.sh (genai's onnxruntime is the one calibrate times). Steps:
1. ``trt-latency calibrate --onnx MODEL/model.onnx`` with the packaged defaults (plus ``--calibrate-args``),
   wall-timed against the plan's stated ``--time-budget`` (overrun = wall - budget); skipped when OUT/cal
   already holds a calibration.yaml (``--recalibrate`` forces it; likewise a genai run already in
   OUT/genai-N.json is read back unless ``--retime``: a rerun of compare.py only rescores).
2. ``--processes`` fresh processes of time_genai.py (the independent timing: held-out requests and the
   per-position step, genai's own ``Generator`` at the same thread count), on the host's ordinary backing
   unless ``--backing-from-calibration`` (then each applies ``trt_latency.apply_backing``).
3. Every held-out request predicted by the calibration (``Estimator.load(cal).predict``, as
   ``trt-latency predict`` does) and compared: request total, TTFT, the decode part of 2-token requests (the
   first step after the prefill), and the decode step at KV 16-4096 vs ``generate_next_token``. Errors are
   (predicted - measured) / measured; per process, then the spread between processes.
4. The same request totals and TTFTs online: each process's requests in order through a serving process's
   ``AdmissionController`` (its drift correction alone, alpha None), fed every request after it ends. The
   host moves a process's level by 5-10% (a loaded model's draw, the hour's drift: docs/decisions.md 14);
   this is what a server that feeds its controller predicts after its first few requests.
Writes OUT/results.md (the table the README quotes), OUT/results.json, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def calibrate(model: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """The default calibrate, wall-timed; the summary's lines kept for the record."""
    from trt_latency.engines.config import load_plan

    plan = load_plan(None)
    budget = plan.sweep.adaptive.time_budget_s if plan.sweep.adaptive is not None else None
    if "--time-budget" in extra:
        budget = float(extra[extra.index("--time-budget") + 1])
    cmd = [sys.executable, "-m", "trt_latency", "calibrate", "--onnx", str(model / "model.onnx"),
           "--out", str(out), "--no-progress", "--no-plot", *extra]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with (out.parent / f"{out.name}.log").open("w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - t0
    text = (out.parent / f"{out.name}.log").read_text()
    if rc != 0:
        raise SystemExit(f"calibrate failed (rc {rc}); see {out.parent / f'{out.name}.log'}:\n{text[-3000:]}")
    summary = text[text.rfind("Summary"):] if "Summary" in text else ""
    # the budget calibrate itself stated (its first line): a real-size model gets pipeline.sized_budget's
    stated = re.search(r"--time-budget ([0-9.]+) (s|min)", text.split("\n", 1)[0])
    if stated:
        budget = float(stated.group(1)) * (60.0 if stated.group(2) == "min" else 1.0)
    return {"command": " ".join(cmd), "wall_s": wall, "budget_s": budget, "summary": summary}


def time_genai(python: str, model: Path, out: Path, args: argparse.Namespace, cal: Path | None) -> dict[str, Any]:
    cmd = [python, str(HERE / "time_genai.py"), str(model), "--out", str(out), "--requests", str(args.requests),
           "--seed", str(args.seed), "--threads", str(args.threads)]
    if cal is not None:
        cmd += ["--backing-from", str(cal)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
    return dict(json.loads(out.read_text()))


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def score(est: Any, run: dict[str, Any]) -> dict[str, Any]:
    """Errors of one genai process's measurements against the calibration's predictions: as calibrated, and
    as a serving process's AdmissionController corrects them online (``online_*``)."""
    from trt_latency.serving.admission import AdmissionController
    from trt_latency.serving.validation import Request

    key = est.configs()[0]
    ks = (key.tier_idx, key.top_k, key.num_active_blocks)
    # The serving side's answer to the host's level (a loaded model's draw, the hour's drift): the controller's
    # drift correction, without a threshold (alpha None), fed each request after it ends, in this process's
    # order, as a server feeds it. Scored on the requests after its first min_observations (before them the
    # correction is 1).
    ctl = AdmissionController(est, alpha=None)
    total, ttft, dec2, flagged = [], [], [], 0
    online_total: list[float] = []
    online_ttft: list[float] = []
    rows = []
    for r in run["requests"]:
        p = est.predict(0, r["prompt"], r["output"], *ks)
        flagged += bool(p.flags)
        total.append(_err(p.total_ms, r["total_ms"]))
        ttft.append(_err(p.prefill_ms, r["ttft_ms"]))
        request = Request(0, r["prompt"], r["output"], *ks)
        if len(total) > ctl.min_observations:
            online_total.append(_err(p.total_ms * ctl.correction(request), r["total_ms"]))
            # a one-token request's correction is the prefill scale of this prompt's length bucket
            online_ttft.append(_err(p.prefill_ms * ctl.correction(Request(0, r["prompt"], 1, *ks)), r["ttft_ms"]))
        ctl.observe(request, r["ttft_ms"], r["total_ms"], r["output"])
        if r["output"] == 2:
            dec2.append(_err(p.decode_ms, r["total_ms"] - r["ttft_ms"]))
        rows.append({"prompt": r["prompt"], "output": r["output"], "measured_ms": r["total_ms"],
                     "predicted_ms": p.total_ms, "ttft_ms": r["ttft_ms"], "predicted_ttft_ms": p.prefill_ms})
    steps = {}
    first = {}
    for s in run["sweep"]:
        meas = float(np.median(s["step_ms"]))
        pred = float(np.median([est.decode_step_ms(kv, *ks) for kv in s["step_kv"]]))
        steps[s["kv"]] = {"measured_ms": meas, "predicted_ms": pred, "err": _err(pred, meas)}
        first[s["kv"]] = {"first_step_ms": s["first_step_ms"], "extra_ms": s["first_step_ms"] - meas}
    a = lambda v: np.abs(np.asarray(v))  # noqa: E731
    return {
        "total_median": float(np.median(a(total))), "total_max": float(np.max(a(total))),
        "total_bias": float(np.median(total)), "ttft_median": float(np.median(a(ttft))),
        "ttft_bias": float(np.median(ttft)), "dec2_median": float(np.median(a(dec2))) if dec2 else float("nan"),
        "dec2_bias": float(np.median(dec2)) if dec2 else float("nan"), "dec2_n": len(dec2),
        "online_total_median": float(np.median(a(online_total))) if online_total else float("nan"),
        "online_total_max": float(np.max(a(online_total))) if online_total else float("nan"),
        "online_ttft_median": float(np.median(a(online_ttft))) if online_ttft else float("nan"),
        "online_n": len(online_total), "online_after": ctl.min_observations,
        "flagged": flagged, "steps": steps, "first_step": first, "requests": rows,
        "anon_huge_mib": run.get("anon_huge_mib"), "backing": run.get("backing"),
    }


def _pct(v: float, signed: bool = False) -> str:
    return "n/a" if v != v else (f"{100 * v:+.1f}%" if signed else f"{100 * v:.1f}%")


def _spread(vals: list[float], signed: bool = False) -> str:
    """"median (min .. max)" over processes."""
    return f"{_pct(float(np.median(vals)), signed)} ({_pct(min(vals), signed)} .. {_pct(max(vals), signed)})"


def table(model: Path, cal_info: dict[str, Any], scores: list[dict[str, Any]], runs: list[dict[str, Any]],
          load: str) -> str:
    n = len(scores)
    lines = [f"### {model.name}: default calibrate vs onnxruntime-genai {runs[0]['versions']['onnxruntime-genai']}"
             f" `Generator` ({n} fresh processes)", ""]
    wall, budget = cal_info.get("wall_s"), cal_info.get("budget_s")
    if wall is not None:
        over = f", overrun {wall - budget:+.0f} s ({100 * (wall / budget - 1):+.0f}%)" if budget else ""
        lines.append(f"calibrate: {wall:.0f} s wall against a stated budget of {budget or '-'} s{over}.")
    lines.append(f"Machine: {load}. genai backing: {runs[0]['backing']}; THP {runs[0]['thp']}; "
                 f"threads {runs[0]['threads']}; onnxruntime {runs[0]['versions']['onnxruntime']}.")
    lines += ["", "Errors are (predicted - measured) / measured; abs. error median / max over the held-out requests, "
              "then the median over processes with the min .. max between processes.", "",
              "| figure | target (issue 24) | measured |", "|---|---|---|"]
    rows = [("request total, median abs. error", "<= 3%", _spread([s["total_median"] for s in scores])),
            ("request total, max abs. error", "<= 8%", _spread([s["total_max"] for s in scores])),
            ("request total, median signed error", "", _spread([s["total_bias"] for s in scores], True)),
            ("TTFT, median abs. error", "<= 3%", _spread([s["ttft_median"] for s in scores])),
            ("TTFT, median signed error", "", _spread([s["ttft_bias"] for s in scores], True)),
            (f"decode part of 2-token requests ({scores[0]['dec2_n']}), median abs. error", "<= 10%",
             _spread([s["dec2_median"] for s in scores])),
            ("decode part of 2-token requests, median signed error", "",
             _spread([s["dec2_bias"] for s in scores], True))]
    for kv in scores[0]["steps"]:
        rows.append((f"decode step at KV {kv} (signed)", "within 5%",
                     _spread([s["steps"][kv]["err"] for s in scores], True)))
    if scores[0].get("online_n"):
        after = f"online ({scores[0]['online_n']} after the first {scores[0]['online_after']})"
        rows += [(f"request total, median abs. error, {after}", "", _spread([s["online_total_median"] for s in scores])),
                 (f"request total, max abs. error, {after}", "", _spread([s["online_total_max"] for s in scores])),
                 (f"TTFT, median abs. error, {after}", "", _spread([s["online_ttft_median"] for s in scores]))]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if scores[0].get("online_n"):
        lines += ["", "Online: each process's requests in order through an AdmissionController (alpha None: its drift "
                  "correction alone), fed each request's TTFT and total after it ends, as a serving process feeds it; "
                  "scored on the requests after its first min_observations."]
    lines += ["", "Per position: genai's `generate_next_token` (median of 8 steady steps, each process) and the "
              "calibration's step; genai's first step after appending the chunk of prompt that brought the KV "
              "there, and its extra over the steady step.", "",
              "| KV | predicted step ms | genai step ms (per process) | chunk | genai first step after the chunk ms | "
              "first-step extra ms |", "|---|---|---|---|---|---|"]
    chunks = {s["kv"]: s.get("chunk", s["kv"]) for s in runs[0]["sweep"]}
    for kv in scores[0]["steps"]:
        meas = " / ".join(f"{s['steps'][kv]['measured_ms']:.2f}" for s in scores)
        first = " / ".join(f"{s['first_step'][kv]['first_step_ms']:.1f}" for s in scores)
        extra = " / ".join(f"{s['first_step'][kv]['extra_ms']:+.1f}" for s in scores)
        lines.append(f"| {kv} | {scores[0]['steps'][kv]['predicted_ms']:.2f} | {meas} | {chunks[kv]} | {first} | "
                     f"{extra} |")
    per_req = np.array([[r["total_ms"] for r in run["requests"]] for run in runs])
    if len(runs) > 1:
        spread = per_req.max(axis=0) / per_req.min(axis=0) - 1
        lines += ["", f"Process-to-process spread of the same request's measured total (max/min - 1): median "
                  f"{_pct(float(np.median(spread)))}, max {_pct(float(np.max(spread)))}."]
    flagged = scores[0]["flagged"]
    if flagged:
        lines.append(f"{flagged} of {len(runs[0]['requests'])} predictions carry a flag (extrapolated / "
                     "factorised).")
    return "\n".join(lines) + "\n"


def machine_load(runs: list[dict[str, Any]], note: str) -> str:
    """The 1-minute load average each genai process saw at its start and end (a quiet machine reads < 1)."""
    seen = [f"{a:.1f}-{b:.1f}" for a, b in (r["load_avg"] for r in runs if "load_avg" in r)]
    got = f"load average over the genai processes {', '.join(seen)}" if seen else "load average not recorded"
    return f"{os.cpu_count()} CPUs, {got} (a quiet machine reads < 1){'; ' + note if note else ''}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="genai model folder (make_models.py)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--genai-python", default=sys.executable)
    ap.add_argument("--recalibrate", action="store_true")
    ap.add_argument("--retime", action="store_true", help="rerun the genai processes whose JSON is already there")
    ap.add_argument("--calibrate-args", default="", help="extra calibrate flags, one string (e.g. '--huge-pages')")
    ap.add_argument("--backing-from-calibration", action="store_true",
                    help="each genai process applies the calibration's backing (trt_latency.apply_backing)")
    ap.add_argument("--quiet", action="store_true", help="no per-request lines from the genai processes")
    ap.add_argument("--note", default="", help="a line on the machine's state for the table (e.g. who else ran)")
    args = ap.parse_args(argv)
    from trt_latency import Estimator

    args.out.mkdir(parents=True, exist_ok=True)
    cal_dir = args.out / "cal"
    cal_path = cal_dir / "calibration.yaml"
    info_path = args.out / "calibrate.json"
    if args.recalibrate or not cal_path.is_file():
        cal_info = calibrate(args.model, cal_dir, args.calibrate_args.split())
        info_path.write_text(json.dumps(cal_info, indent=1))
        print(cal_info["summary"], flush=True)
    else:
        cal_info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        print(f"{cal_path}: already there (--recalibrate to redo)", flush=True)
    est = Estimator.load(cal_path)
    runs = []
    for i in range(args.processes):
        path = args.out / f"genai-{i + 1}.json"
        if path.is_file() and not args.retime:
            print(f"{path}: already there (--retime to redo)", flush=True)
            runs.append(dict(json.loads(path.read_text())))
            continue
        runs.append(time_genai(args.genai_python, args.model, path, args,
                               cal_path if args.backing_from_calibration else None))
    scores = [score(est, run) for run in runs]
    md = table(args.model, cal_info, scores, runs, machine_load(runs, args.note))
    (args.out / "results.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps({"calibrate": cal_info, "scores": scores}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
