"""`trt-latency bench`: ns per admit decision, Cython and pure-Python reference in the same run.

Each figure is the median of several rounds of timeit loops. The "bare" line is a plain Python
function with admit's signature, called with the same arguments: the floor any Python-callable
admission check pays. Targets (issue 3): Cython <= 500 ns and <= 10x bare; reference/Cython >= 10x;
batch >= 10 M decisions/s on one core. The serving-loop line times AdmissionController.decide(request)
(issue 5: <= 1 us) on a controller whose online correction and threshold are live (fed a few
hundred synthetic observations first), next to a bare Python method taking the same Request.
The choose line times Estimator.choose over 8 candidates that all miss the budget (issue 11: <= 1 us).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import timeit
from typing import Any

import numpy as np

from trt_latency.cli._args import positive_int

EXAMPLE = """\
examples:
  trt-latency bench -c calibration.yaml
  trt-latency bench -c calibration.yaml --rounds 9 --json
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench",
        help="time admit decisions: Cython vs reference vs a bare Python call, and batch throughput",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--calibration", required=True, metavar="CAL", help="calibration.yaml to load")
    p.add_argument("--rounds", type=positive_int, default=7, metavar="R", help="rounds per figure; medians are shown")
    p.add_argument("--number", type=positive_int, default=200_000, metavar="N", help="calls per round (Cython, bare)")
    p.add_argument("--batch", type=positive_int, default=1_000_000, metavar="N", help="requests per batch call")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def bare_admit(budget_ms: Any, vision_tokens: Any, text_tokens: Any, max_new_tokens: Any = None, tier_idx: Any = 0,
               top_k: Any = 1, num_active_blocks: Any = None, alpha: Any = None) -> None:  # fmt: skip
    """Same signature as Estimator.admit, does nothing: the cost of calling Python at all."""
    return None


def _ns_per_call(func: Any, kwargs: dict[str, Any], number: int, rounds: int) -> float:
    timer = timeit.Timer("f(budget, vision_tokens=v, text_tokens=t, max_new_tokens=n, tier_idx=ti, top_k=k, "
                         "num_active_blocks=b, alpha=a)", globals={"f": func, **kwargs})  # fmt: skip
    return statistics.median(timer.repeat(repeat=rounds, number=number)) / number * 1e9


def run_bench(path: str, rounds: int = 7, number: int = 200_000, batch: int = 1_000_000) -> dict[str, Any]:
    from trt_latency.estimator import _reference
    from trt_latency.estimator.kernels import impl
    from trt_latency.estimator.model import Estimator

    est = Estimator.load(path)
    ref = Estimator.load(path, implementation=_reference)
    key = est.configs()[0]
    pred = est.predict(64, 100, 64, *key)
    kwargs = {"budget": round(pred.total_ms * 1.1, 3), "v": 64, "t": 100, "n": 64, "ti": key.tier_idx,
              "k": key.top_k, "b": key.num_active_blocks, "a": 0.05}  # fmt: skip
    out: dict[str, Any] = {"calibration": path, "kernels": impl.IMPLEMENTATION, "rounds": rounds,
                           "request": kwargs}  # fmt: skip
    out["cython_ns"] = _ns_per_call(est.admit, kwargs, number, rounds) if est.implementation == "cython" else None
    out["reference_ns"] = _ns_per_call(ref.admit, kwargs, max(number // 50, 1000), rounds)
    out["bare_python_ns"] = _ns_per_call(bare_admit, kwargs, number, rounds)
    fast = out["cython_ns"]
    out["cython_over_bare"] = None if fast is None else fast / out["bare_python_ns"]
    out["reference_over_cython"] = None if fast is None else out["reference_ns"] / fast

    rng = np.random.default_rng(0)
    keys = est.configs()
    pick = rng.integers(0, len(keys), batch)
    arrays = {
        "budget_ms": rng.uniform(0.5, 2.0, batch) * pred.total_ms,
        "vision_tokens": rng.choice(np.array([0, 64, 256, 576]), batch),
        "text_tokens": rng.integers(8, 512, batch),
        "max_new_tokens": np.where(rng.random(batch) < 0.2, -1, rng.integers(1, 256, batch)),
        "tier_idx": np.array([keys[i].tier_idx for i in range(len(keys))])[pick],
        "top_k": np.array([keys[i].top_k for i in range(len(keys))])[pick],
        "num_active_blocks": np.array([keys[i].num_active_blocks for i in range(len(keys))])[pick],
    }
    rates, cpu_rates = [], []
    for _ in range(rounds):
        t, c = timeit.default_timer(), time.process_time()
        est.admit_batch(alpha=0.05, **arrays)
        rates.append(batch / (timeit.default_timer() - t))
        cpu_rates.append(batch / max(time.process_time() - c, 1e-9))
    out["batch_decisions_per_s"] = statistics.median(rates)
    # CPU time of this process: what one core delivers when the machine is shared (wall clock is not).
    out["batch_decisions_per_cpu_s"] = statistics.median(cpu_rates)
    small = {k: v[: max(batch // 200, 1000)] for k, v in arrays.items()}
    t = timeit.default_timer()
    ref.admit_batch(alpha=0.05, **small)
    out["reference_batch_decisions_per_s"] = len(small["budget_ms"]) / (timeit.default_timer() - t)
    out.update(_bench_decide(est, kwargs, number, rounds))
    out.update(_bench_choose(est, kwargs, number, rounds))
    out.update(_bench_batch(est, key, rounds, max(number // 10, 2000)))
    return out


def _bench_batch(est: Any, key: Any, rounds: int, number: int, running: int = 64) -> dict[str, Any]:
    """BatchAdmissionController.decide with ``running`` requests in the batch (the protect policy: both
    simulations, with and without the newcomer), beside a bare Python call with the same arguments."""
    from trt_latency.serving.batch_admission import BatchAdmissionController, BatchEstimator

    best = BatchEstimator.from_estimator(est, *key)
    ctl = BatchAdmissionController(best, alpha=None, policy="protect", max_batch=running + 1)
    rng = np.random.default_rng(1)
    lo, hi = (int(v) for v in est.calibration.config(*key).valid_past_len)
    for i in range(running):
        ctl.started(i, int(rng.integers(max(lo, 1), max(hi // 2, lo + 2))), int(rng.integers(2, 128)),
                    float(rng.uniform(1e3, 1e5)), now=0.0)
    prompt, n = 100, 32
    # a budget the newcomer fits (twice its prediction), so the timed decision is a judged admit
    budget = 2.0 * float(ctl.decide(-1, prompt, n, 1e12, 1.0).predicted_ms)

    def bare(rid: Any, prompt: Any, max_new_tokens: Any, budget_ms: Any, now: Any = None) -> None:
        return None

    def per_call(f: Any, tokens: int = n, stmt: str = "f(-1, p, n, b, 1.0)", **more: Any) -> float:
        timer = timeit.Timer(stmt, globals={"f": f, "p": prompt, "n": tokens, "b": budget, **more})
        return statistics.median(timer.repeat(repeat=rounds, number=number)) / number * 1e9

    d = ctl.decide(-1, prompt, n, budget, 1.0)
    out = {"batch_decide_running": running, "batch_decide_ns": per_call(ctl.decide),
           "batch_decide_bare_python_ns": per_call(bare), "batch_decide_compiled": best._kernel is not None,
           "batch_decide_sample": {"admit": bool(d.admit), "code": int(d.code), "reason": d.reason,
                                   "max_new_tokens": n}}
    state = getattr(ctl, "_state", None)
    if state is not None:
        # After an event (a step, a start, a finish) the batch's own finish times are recomputed once:
        # invalidate + decide, and the newcomer outliving the whole batch (every segment holds it).
        inv = per_call(state.invalidate, stmt="f()")
        out["batch_decide_after_event_ns"] = per_call(ctl.decide, n, "i(); f(-1, p, n, b, 1.0)",
                                                      i=state.invalidate) - inv
        out["batch_decide_after_event_long_ns"] = per_call(ctl.decide, 100_000, "i(); f(-1, p, n, b, 1.0)",
                                                           i=state.invalidate) - inv
    return out


def _bench_choose(est: Any, kw: dict[str, Any], number: int, rounds: int) -> dict[str, Any]:
    """ns per Estimator.choose over 8 candidates (the preference order, cycled) with a budget none of
    them fits, so all 8 are evaluated: the worst case of one choose call."""
    cands = [est.preference[i % len(est.preference)] for i in range(8)]
    cheapest = min(est.predict(kw["v"], kw["t"], kw["n"], *k).total_ms for k in est.preference)
    budget = round(cheapest * 0.5, 3)
    timer = timeit.Timer("f(b, v, t, n, c, a)", globals={"f": est.choose, "b": budget, "v": kw["v"], "t": kw["t"],
                                                          "n": kw["n"], "c": cands, "a": kw["a"]})  # fmt: skip
    ns = statistics.median(timer.repeat(repeat=rounds, number=max(number // 4, 1000))) / max(number // 4, 1000) * 1e9
    d = est.choose(budget, kw["v"], kw["t"], kw["n"], cands, kw["a"])
    return {"choose_ns": ns, "choose_candidates": len(cands), "choose_budget_ms": budget, "choose_admit": bool(d.admit)}


class _BareController:
    def decide(self, request: Any) -> None:
        """Same call shape as AdmissionController.decide, does nothing."""
        return None


def _bench_decide(est: Any, kw: dict[str, Any], number: int, rounds: int) -> dict[str, Any]:
    """ns per AdmissionController.decide with the correction and threshold live, vs a bare method."""
    from trt_latency.serving.admission import AdmissionController, Request

    ctl = AdmissionController(est, alpha=0.05)
    rng = np.random.default_rng(1)
    for _ in range(400):  # synthetic traffic: true = predicted * lognormal noise, budgets around it
        v, t, n = int(rng.choice([0, 64, 256])), int(rng.integers(8, 257)), int(rng.integers(2, 65))
        p = est.predict(v, t, n, kw["ti"], kw["k"], kw["b"])
        noise = float(np.exp(0.08 * rng.standard_normal()))
        r = Request(v, t, n, kw["ti"], kw["k"], kw["b"], p.total_ms * float(rng.uniform(0.5, 2.0)))
        if ctl.decide(r).admit:
            ctl.observe(r, p.prefill_ms * noise, p.total_ms * noise)
    request = Request(kw["v"], kw["t"], kw["n"], kw["ti"], kw["k"], kw["b"], float(kw["budget"]))
    online = bool(ctl.counters()["thresholds"])

    def per_call(obj: Any) -> float:
        timer = timeit.Timer("f(r)", globals={"f": obj.decide, "r": request})
        return statistics.median(timer.repeat(repeat=rounds, number=number)) / number * 1e9

    decide_ns = per_call(ctl)
    bare_ns = per_call(_BareController())
    return {"decide_ns": decide_ns, "decide_bare_python_ns": bare_ns, "decide_over_bare": decide_ns / bare_ns,
            "decide_threshold_online": online, "decide_reason": str(ctl.decide(request).reason)}


def run(args: argparse.Namespace) -> int:
    res = run_bench(args.calibration, args.rounds, args.number, args.batch)
    if args.json:
        print(json.dumps(res))
        return 0

    def ns(v: float | None) -> str:
        return "n/a (extension not built)" if v is None else f"{v:8.1f} ns"

    def x(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    r = res["request"]
    print(f"admit(budget_ms={r['budget']}, vision_tokens={r['v']}, text_tokens={r['t']}, max_new_tokens={r['n']}, "
          f"tier_idx={r['ti']}, top_k={r['k']}, num_active_blocks={r['b']}, alpha={r['a']})  "
          f"median of {res['rounds']} rounds")  # fmt: skip
    print(f"  cython      {ns(res['cython_ns'])} per call")
    print(f"  reference   {ns(res['reference_ns'])} per call")
    print(f"  bare python {ns(res['bare_python_ns'])} per call (same signature and arguments, empty body)")
    print(f"  cython / bare python   {x(res['cython_over_bare'])}   (target <= 10x, and <= 500 ns)")
    print(f"  reference / cython     {x(res['reference_over_cython'])}   (target >= 10x)")
    print(f"  batch (admit_batch)    {res['batch_decisions_per_s'] / 1e6:8.1f} M decisions/s wall clock, "
          f"{res['batch_decisions_per_cpu_s'] / 1e6:.1f} M per CPU-second, one thread "
          f"(reference {res['reference_batch_decisions_per_s'] / 1e3:.1f} k/s; target >= 10 M/s)")  # fmt: skip
    print(f"BatchAdmissionController.decide with {res['batch_decide_running']} running (protect): "
          f"{res['batch_decide_ns']:.1f} ns per call, bare python {res['batch_decide_bare_python_ns']:.1f} ns "
          f"(target <= 2000 ns){'' if res['batch_decide_compiled'] else ' [pure-Python reference]'}")
    if "batch_decide_after_event_ns" in res:
        print(f"  right after an event (batch finish times recomputed): {res['batch_decide_after_event_ns']:.1f} ns; "
              f"a newcomer outliving the batch: {res['batch_decide_after_event_long_ns']:.1f} ns")
    print(f"AdmissionController.decide(Request(...)) with the online correction and threshold "
          f"{'live' if res['decide_threshold_online'] else 'NOT live'}:")
    print(f"  decide      {ns(res['decide_ns'])} per call   (target <= 1 us; Estimator.admit above: "
          f"{ns(res['cython_ns']).strip()})")
    print(f"  bare python {ns(res['decide_bare_python_ns'])} per call (a method taking the same Request)")
    print(f"  decide / bare python   {x(res['decide_over_bare'])}")
    print(f"Estimator.choose over {res['choose_candidates']} candidates, budget {res['choose_budget_ms']} ms "
          f"(none fits: all evaluated):")
    print(f"  choose      {ns(res['choose_ns'])} per call   (target <= 1 us)")
    return 0
