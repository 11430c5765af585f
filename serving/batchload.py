"""Continuous-batching load test: one arrival trace, replayed on the real engine under each admission policy.

The loop is iteration-level (vLLM / TensorRT-LLM style): each iteration admits and prefills arrivals (one
``runner.time_step(0, S, 1)`` each: on ONNX Runtime the prefill is its own call and stalls the batch), then
runs ONE batched decode step for every running request (``runner.time_batch_step(kv_lens, 1)``). Time is
a virtual clock advanced by the engine's own measured milliseconds per call (the timed region of the
runner: the engine call only), so Poisson arrivals land on engine time and every policy sees the same
trace; the policies' engine calls are interleaved (the one with the earliest clock goes next), so
machine noise hits them alike.

Policies:
- ``admit-all``: every request queues (FIFO) for a batch slot;
- ``queued-token-cap``: vLLM's max-num-queued-tokens rule: reject on arrival when the queued prompt
  tokens would exceed target TTFT x prefill throughput (tokens / ms of the prefill model at the mean prompt);
- ``seed``: the seed's rule: one constant ms/token, the single-request step at the largest KV bucket
  (the longest prompt + output the stream draws) x 1.3; admit iff prefill + (n - 1) x rate <= budget;
- ``trt-latency``: batch-aware admission (serving/batch_admission.py, policy protect): an arrival waits
  for a slot; when one is free it is admitted iff its predicted total with the running batch (times the
  conformal factor for alpha) fits what is left of its budget and no running request is pushed past its
  deadline; it is rejected as soon as it cannot fit its own budget even alone.
Reported per policy: goodput_rps (finished within budget per second of the policy's makespan),
violation_rate (admitted that missed their budget / admitted), admitted, rejected, p99_ttft_ms, p99_tpot_ms.

Conformal factor (how it is fitted): a separate trace (another seed, same rate and mix) is replayed under
the trt-latency policy with factor 1; for each admitted request the score is (finish - decision time) /
(its predicted finish after the last admission into its batch - decision time): under ``protect`` a later
admission may use a request's slack but not its deadline, so this isolates the model's own error.
The policy run starts from that factor and follows the machine online: the controller's window is seeded
with the replay's scores and every request it finishes adds its own (BatchAdmissionController.finished);
the factor is the window's split-conformal quantile for alpha. Even-indexed admitted requests fit
the factor per alpha (split conformal: the ceil((n+1)(1-alpha))-th smallest score), odd ones are held out
and their coverage (share with score <= factor) is reported.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trt_latency.serving.batch_admission import BatchAdmissionController, BatchEstimator
from trt_latency.serving.loadgen import StreamSpec, draw_lengths

POLICY_NAMES = ("admit-all", "queued-token-cap", "seed", "trt-latency")


@dataclass(frozen=True)
class Arrival:
    index: int
    at_ms: float
    prompt: int
    output: int
    budget_ms: float


@dataclass
class _Req:
    a: Arrival
    kv: int = 0
    left: int = 0
    decided_ms: float = math.nan
    predicted_ms: float = math.nan
    first_ms: float = math.nan
    done_ms: float = math.nan
    latest_pred_ms: float = math.nan  # absolute predicted finish after the last admission into its batch


@dataclass
class PolicyRun:
    """One policy's replay of the trace."""

    name: str
    clock: float = 0.0
    next_arrival: int = 0
    queue: deque[_Req] = field(default_factory=deque)
    running: list[_Req] = field(default_factory=list)
    done: list[_Req] = field(default_factory=list)
    rejected: int = 0
    queued_tokens: int = 0
    controller: BatchAdmissionController | None = None
    track: bool = False  # keep each running request's latest predicted finish (the scores)
    online: bool = False  # feed the controller the scores of finished requests (the online factor)


def make_trace(spec: StreamSpec, n: int, rate_rps: float, classes: Sequence[float], seed: int) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    lengths = draw_lengths(spec, n, rng)
    gaps = rng.exponential(1e3 / rate_rps, n)
    at = np.cumsum(gaps) - gaps[0]
    return [Arrival(i, float(at[i]), v + t, o, float(classes[int(rng.integers(len(classes)))]))
            for i, (v, t, o) in enumerate(lengths)]


class BatchLoadtest:
    """The replay machinery: one runner, one trace, the policies side by side."""

    def __init__(self, runner: Any, est: BatchEstimator, max_batch: int, alpha: float,
                 seed_rate_ms: float, token_cap: int) -> None:
        if not hasattr(runner, "time_batch_step"):
            raise RuntimeError("this runner has no time_batch_step (the engine side's batched decode step)")
        self.runner = runner
        self.est = est
        self.max_batch = max_batch
        self.alpha = alpha
        self.seed_rate_ms = seed_rate_ms
        self.token_cap = token_cap

    # ------------------------------------------------------------- engine calls
    def _prefill(self, prompt: int) -> float:
        return float(self.runner.time_step(0, int(prompt), 1)[0])

    def _decode(self, kv_lens: list[int]) -> float:
        return float(self.runner.time_batch_step(kv_lens, 1)[0])

    # ------------------------------------------------------------- one iteration
    def _arrive(self, run: PolicyRun, trace: Sequence[Arrival]) -> None:
        while run.next_arrival < len(trace) and trace[run.next_arrival].at_ms <= run.clock:
            a = trace[run.next_arrival]
            run.next_arrival += 1
            r = _Req(a)
            if run.name == "queued-token-cap" and run.queued_tokens + a.prompt > self.token_cap:
                run.rejected += 1
                continue
            if run.name == "seed":
                pred = self.est.prefill_ms(a.prompt) + (a.output - 1) * self.seed_rate_ms
                if pred > a.budget_ms:
                    run.rejected += 1
                    continue
            run.queue.append(r)
            run.queued_tokens += a.prompt

    def _start(self, run: PolicyRun, r: _Req) -> None:
        run.queued_tokens -= r.a.prompt
        run.clock += self._prefill(r.a.prompt)
        r.first_ms = run.clock
        r.kv, r.left = r.a.prompt, r.a.output - 1
        if r.left <= 0:
            r.done_ms = run.clock
            run.done.append(r)
            if run.controller is not None:
                self._finished(run, r)
        else:
            run.running.append(r)

    def _finished(self, run: PolicyRun, r: _Req) -> None:
        """Tell the controller; during a policy run (online) with the score's two durations."""
        assert run.controller is not None
        if run.online and r.latest_pred_ms > r.decided_ms:
            run.controller.finished(r.a.index, r.done_ms - r.decided_ms, r.latest_pred_ms - r.decided_ms)
        else:
            run.controller.finished(r.a.index)

    def _schedule(self, run: PolicyRun) -> None:
        if run.controller is None:
            while run.queue and len(run.running) < self.max_batch:
                self._start(run, run.queue.popleft())
            return
        ctl = run.controller
        keep: deque[_Req] = deque()
        admitted_any = False
        while run.queue:
            r = run.queue.popleft()
            left_ms = r.a.budget_ms - (run.clock - r.a.at_ms)
            if len(run.running) >= self.max_batch:
                alone = self.est.decide_sorted(_EMPTY, _EMPTY, _EMPTY, 0.0, r.a.prompt, r.a.output, left_ms,
                                               ctl.base_factor, False, False)
                if alone.admit:
                    keep.append(r)  # it could still make it: wait for a slot
                else:
                    run.queued_tokens -= r.a.prompt
                    run.rejected += 1
                continue
            d = ctl.decide(r.a.index, r.a.prompt, r.a.output, left_ms, now=run.clock)
            if d.admit:
                r.decided_ms, r.predicted_ms = run.clock, float(d.predicted_ms) / ctl.base_factor
                ctl.started(r.a.index, r.a.prompt, r.a.output, left_ms, now=run.clock)
                self._start(run, r)
                r.latest_pred_ms = r.decided_ms + r.predicted_ms
                admitted_any = True
            elif d.code // 2 == 3:  # it fits alone but would push someone late: wait
                keep.append(r)
            else:
                run.queued_tokens -= r.a.prompt
                run.rejected += 1
        run.queue = keep
        if run.track and admitted_any and run.running:
            from trt_latency.serving.batch_admission import Running

            times = self.est.finish_times([Running(r.kv, r.left) for r in run.running])
            for r, t in zip(run.running, times, strict=True):
                r.latest_pred_ms = run.clock + t

    def _step(self, run: PolicyRun) -> None:
        run.clock += self._decode([r.kv for r in run.running])
        still = []
        for r in run.running:
            r.kv += 1
            r.left -= 1
            if r.left <= 0:
                r.done_ms = run.clock
                run.done.append(r)
            else:
                still.append(r)
        if run.controller is not None:
            run.controller.step()
            for r in run.running:
                if r.left <= 0:
                    self._finished(run, r)
        run.running = still

    def iterate(self, run: PolicyRun, trace: Sequence[Arrival]) -> bool:
        """One iteration; False when the trace is fully served."""
        self._arrive(run, trace)
        if not run.running and not run.queue:
            if run.next_arrival >= len(trace):
                return False
            run.clock = max(run.clock, trace[run.next_arrival].at_ms)  # idle until the next arrival
            self._arrive(run, trace)
        self._schedule(run)
        if run.running:
            self._step(run)
        elif run.queue and run.next_arrival < len(trace):
            run.clock = max(run.clock, trace[run.next_arrival].at_ms)  # all waiting: nothing to run
        return True

    def new_run(self, name: str, factor: float | None = None) -> PolicyRun:
        run = PolicyRun(name)
        if name == "trt-latency":
            run.controller = BatchAdmissionController(self.est, alpha=self.alpha, policy="protect",
                                                      max_batch=self.max_batch)
            run.track = True
            if factor is not None:
                run.controller.base_factor = factor
        return run

    def replay(self, trace: Sequence[Arrival], runs: list[PolicyRun]) -> None:
        """Advance the runs together, always the one with the earliest clock (interleaved engine calls)."""
        live = list(runs)
        while live:
            run = min(live, key=lambda r: r.clock)
            if not self.iterate(run, trace):
                live.remove(run)


_EMPTY = np.zeros(0, dtype=np.float64)


def summarize_run(run: PolicyRun, n: int) -> dict[str, Any]:
    admitted = len(run.done) + len(run.running)
    good = [r for r in run.done if r.done_ms - r.a.at_ms <= r.a.budget_ms]
    late = admitted - len(good)
    start = min((r.a.at_ms for r in run.done), default=0.0)
    span_s = (max((r.done_ms for r in run.done), default=0.0) - start) / 1e3
    ttft = [r.first_ms - r.a.at_ms for r in run.done]
    tpot = [(r.done_ms - r.first_ms) / (r.a.output - 1) for r in run.done if r.a.output > 1]
    return {"requests": n, "admitted": admitted, "rejected": run.rejected,
            "goodput_rps": len(good) / span_s if span_s > 0 else 0.0,
            "violation_rate": late / admitted if admitted else 0.0,
            "p99_ttft_ms": float(np.percentile(ttft, 99)) if ttft else None,
            "p99_tpot_ms": float(np.percentile(tpot, 99)) if tpot else None,
            "makespan_s": span_s}


def fit_batch_conformal(run: PolicyRun, alphas: Sequence[float]) -> dict[str, Any]:
    """Split-conformal factors per alpha from a factor-1 replay (even admitted requests fit, odd held out)."""
    from trt_latency.serving.conformal import conformal_factor

    scored = sorted((r for r in run.done if math.isfinite(r.latest_pred_ms) and r.latest_pred_ms > r.decided_ms),
                    key=lambda r: r.a.index)
    scores = np.asarray([(r.done_ms - r.decided_ms) / (r.latest_pred_ms - r.decided_ms) for r in scored])
    fit, held = scores[0::2], scores[1::2]
    factors, coverage = [], []
    for a in alphas:
        f = conformal_factor(fit, a)
        factors.append(f)
        coverage.append(float(np.mean(held <= f)) if held.size and math.isfinite(f) else None)
    return {"alphas": list(alphas), "factors": factors, "n_fit": int(fit.size), "n_heldout": int(held.size),
            "scores": [float(v) for v in scores],
            "heldout_coverage": coverage, "median_score": float(np.median(scores)) if scores.size else None,
            "how": "replay of batched traffic under trt-latency (factor 1, protect): score = (finish - decision "
                   "time) / (predicted finish after the last admission into its batch - decision time): the model's "
                   "error, since protect keeps later admissions inside every deadline; even admitted requests "
                   "fit, odd ones held out"}


def seed_rate_ms(est: BatchEstimator, spec: StreamSpec) -> float:
    """The seed's constant: single-request step at the largest KV the stream draws, x 1.3."""
    longest = (max(spec.vision_tokens) + spec.text_tokens[1]) + spec.output_tokens[1]
    if spec.max_kv is not None:
        longest = min(longest, spec.max_kv)
    return 1.3 * est.step_ms([longest])


def run_policies(runner: Any, est: BatchEstimator, spec: StreamSpec, n: int, max_batch: int, alpha: float,
                 rate_rps: float | None = None, overload: float = 2.0, calibrate_n: int = 300,
                 seed: int = 0, ttft_target_ms: float | None = None,
                 slo_quantiles: Sequence[float] = (0.3, 0.5, 0.7, 0.9)) -> dict[str, Any]:
    """The whole batched load test: classes, rate, conformal replay, then the four policies side by side."""
    mix = draw_lengths(spec, 2000, np.random.default_rng(seed + 77))
    prompts = np.asarray([v + t for v, t, _ in mix], dtype=np.float64)
    outs = np.asarray([o for _, _, o in mix], dtype=np.float64)
    half = max(1, max_batch // 2)
    # Budgets: quantiles of each request's predicted total in a half-full batch of the mix's typical lengths.
    typical = [Running_like(int(np.median(prompts) + np.median(outs) / 2), int(np.median(outs)))] * (half - 1)
    preds = [est.total_with(typical, int(p), int(o)) for p, o in zip(prompts[:400], outs[:400], strict=True)]
    classes = tuple(round(float(q), 1) for q in np.quantile(preds, slo_quantiles))
    # Capacity: a full batch of typical requests; the arrival rate is `overload` times that.
    per_req_ms = est.prefill_ms(int(np.mean(prompts))) + float(np.mean(outs)) * est.step_ms(
        [int(np.mean(prompts) + np.mean(outs) / 2)] * max_batch) / max_batch
    capacity = 1e3 / per_req_ms
    rate = rate_rps if rate_rps is not None else overload * capacity
    mean_p = float(np.mean(prompts))
    throughput = mean_p / max(est.prefill_ms(int(mean_p)), 1e-9)  # prefill tokens per ms
    target = ttft_target_ms if ttft_target_ms is not None else 0.25 * float(np.median(classes))
    token_cap = max(int(target * throughput), int(np.max(prompts)))
    lt = BatchLoadtest(runner, est, max_batch, alpha, seed_rate_ms(est, spec), token_cap)
    conformal = None
    factor = 1.0
    if calibrate_n > 0:
        cal_run = lt.new_run("trt-latency", factor=1.0)
        lt.replay(make_trace(spec, calibrate_n, rate, classes, seed + 1000), [cal_run])
        conformal = fit_batch_conformal(cal_run, sorted({alpha, 0.01, 0.05, 0.1, 0.5}))
        f = dict(zip(conformal["alphas"], conformal["factors"], strict=True)).get(alpha)
        factor = float(f) if f is not None and math.isfinite(f) else 1.0
    trace = make_trace(spec, n, rate, classes, seed)
    runs = [lt.new_run(name, factor=factor) for name in POLICY_NAMES]
    ours = runs[POLICY_NAMES.index("trt-latency")]
    ours.online = True
    if conformal is not None and ours.controller is not None:
        # The online window starts from the replay's scores; then every finished request adds its own.
        ours.controller.seed_scores(conformal.pop("scores"))
    lt.replay(trace, runs)
    return {"alpha": alpha, "max_batch": max_batch, "requests": n, "rate_rps": rate,
            "capacity_rps_estimate": capacity, "overload": rate / capacity,
            "budget_classes_ms": list(classes), "queued_token_cap": token_cap, "ttft_target_ms": target,
            "seed_ms_per_token": lt.seed_rate_ms, "factor": factor, "conformal": conformal,
            "trt_latency_controller": None if ours.controller is None else ours.controller.counters(),
            "policies": {run.name: summarize_run(run, n) for run in runs}}


def Running_like(kv: int, left: int) -> Any:  # noqa: N802 - a Running, named for what it stands for here
    from trt_latency.serving.batch_admission import Running

    return Running(max(1, kv), max(1, left))
