"""How calibrate spends --time-budget: a pilot prices each kind of measurement on this model, an
allocation turns the prices into the plan's sizes (replayed requests, position-grid density, prefill
reps) and per-phase deadlines, and a ledger records where the time went and what ran past the budget.

The arithmetic only: no runner is opened here except through the one the caller passes to ``pilot``.
Used by trt_latency/pipeline.py (``measure`` per target, ``calibrate`` over targets) and, through the
same ``measure``, by the Ray actors of trt_latency/cluster.py.

Why these shares (``allocate``). Held-out request-level error has three sources a budget can buy down:
the decode curve's noise per position (more rounds), the curve's shape between positions (a denser grid),
and the serving-loop terms plus conformal factors (more replayed requests; the factors need held-out
requests at all, 20 for alpha 0.05). On the 2-core machines the curve's noise stops falling after a few
tens of rounds (the machine's drift dominates: docs/decisions.md, 10), while the loop terms moved request
totals by 10-40% (the summary's engine-only -> with-loop column), so the replay gets a fixed third of
what the sweep and replay share, never fewer than MIN_REQUESTS, and the sweep the rest. The grid is
thinned only when the sweep's share cannot give every position MIN_USEFUL_ROUNDS rounds (a big model):
fewer positions with more rounds beat many positions with three each (configs/default.yaml: 24 x 150
rounds gave LOPO 0.6-2.4%, 37 x 25 gave 1.8-4.2%). Prefill reps are capped so that the prefill visits take
at most PREFILL_SHARE of the sweep's share. The batch sweep and the encoder sweep get fixed shares of what
their target may spend; they are checks and a separate term, not the decode curve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

BATCH_SHARE = 0.15  # of a target's window, for the plan's batch sweep (past its MIN_ROUNDS)
VISION_SHARE = 0.15  # of the primary target's window, for the encoder sweep (VLM chain)
REPLAY_SHARE = 1 / 3  # of what sweep + replay share (module docstring)
PREFILL_SHARE = 0.35  # of the sweep's share at most for prefill visits (caps prefill reps)
FIT_RESERVE_S = 8.0  # fit, two plots, loop terms, conformal factors and the summary after the last target (2 cores)
MIN_PASS_S = 1.0  # a second sweep pass shorter than this is not worth reopening a runner
REPLAY_OVERHEAD = 1.3  # a replayed request over its engine steps, until the pilot measures this model's
MIN_REQUESTS = 20  # per config: 10 held out (conformal factors down to alpha 0.1) and 10 for the loop terms
# Replayed requests a config gets even when the window cannot pay for MIN_REQUESTS beside the sweep's floor
# (a real-size model in the default budget): the loop terms (o, c(P), o_p) moved 2-token requests by 30-60%
# on a 0.5B-class genai model (benchmarks/realsize), more than any sweep round buys, so they are a floor
# like the sweep's MIN_ROUNDS, not a share.
MIN_LOOP_REQUESTS = 8
# The replay's longest output is halved (down to this) while the window cannot hold MIN_REQUESTS of its
# mix: the loop terms (o, c(P), o_p) and the conformal factors want many requests over the prompt range,
# and the decode curve at long KV comes from the sweep, not from long replayed outputs (a 0.5B model:
# 7 s per request of the 2-256 mix, 8 requests in the default window, 4 to fit the loop terms on).
MIN_REPLAY_OUTPUT = 16
MIN_USEFUL_ROUNDS = 30  # rounds per position below which a thinner grid buys more than it costs
MIN_LOG_POINTS, MIN_LINEAR_POINTS = 4, 3  # the thinnest grid (plus 1, 2, 4 and max, always there)
# The prefill grid thins to no fewer lengths. A quadratic needs three, but through three it interpolates
# each length's noise and the curve's shape between them: on the 0.5B int4 model, 8 / 256 / 1024 put the
# prefill 4-9% high at 32-96 tokens, 8 / 64 / 256 / 1024 within 4% (benchmarks/realsize/prefill_ab.py;
# docs/decisions.md 17). The fourth is a short one, 5% of a round.
MIN_PREFILL_LENGTHS = 4
MIN_ROUNDS = 3  # = engines.sweep.MIN_ROUNDS: every shape gets these, budget or not
PILOT_SLOW_MS = 500.0  # a pilot shape this slow is priced from its first run (_price)
PILOT_RUNS = 3  # runs per pilot shape (the first one pays the shape change; the median of the rest)


# ------------------------------------------------------------------------------------------ pilot


@dataclass
class Prices:
    """What one measurement costs on this model and machine, from the pilot (milliseconds)."""

    decode: list[tuple[int, float]]  # (past_len, ms of one decode step)
    prefill: list[tuple[int, float]]  # (prompt length, ms of one prefill)
    request_overhead: float = REPLAY_OVERHEAD  # a replayed request's wall / its priced engine steps
    seconds: float = 0.0  # what the pilot itself took

    def decode_ms(self, past_len: float) -> float:
        x, y = zip(*sorted(self.decode), strict=True)
        return float(np.interp(past_len, x, y))

    def prefill_ms(self, length: float) -> float:
        x, y = zip(*sorted(self.prefill), strict=True)
        if len(x) >= 3 and length > x[-1]:  # beyond the last length: the quadratic's growth, not a flat line
            return float(y[-1]) * (length / x[-1]) ** 2
        return float(np.interp(length, x, y))

    def request_s(self, prompt: int, output: int) -> float:
        """One replayed request: its prefill plus (output - 1) steps at the mean position it passes."""
        ms = self.prefill_ms(prompt) + (output - 1) * self.decode_ms(prompt + output / 2.0)
        return ms * 1e-3 * self.request_overhead


def pilot(runner: Any, max_past_len: int, prefill_lengths: list[int],
          replay: Callable[[Prices], float] | None = None) -> Prices:
    """Price a decode step at a few KV lengths (1, the geometric middle, the max), a prefill at a few
    lengths (``_price_prefill``) and, when ``replay`` is given (a function that replays one request and
    returns its measured / priced ratio under the prices so far), a replayed request: a second or two on a
    fixture, a few seconds on a 0.5B-class model. Rows are not written: the sweep measures for real."""
    t0 = time.perf_counter()
    kv = sorted({1, max(int(round(math.sqrt(max_past_len))), 1), max_past_len})
    decode = [(p, float(np.median(runner.time_step(p, 1, PILOT_RUNS)[1:]))) for p in kv]
    prefill = _price_prefill(runner, sorted(set(prefill_lengths))) or [(1, decode[0][1])]
    prices = Prices(decode, prefill)
    if replay is not None:
        # One measured request against its price from the steps just timed: the loop's own overhead
        # (binding, argmax, feeding the KV back) on this model, within sane bounds.
        prices.request_overhead = float(np.clip(replay(prices), 1.0, 3.0))
    prices.seconds = time.perf_counter() - t0
    return prices


def _price_prefill(runner: Any, lengths: list[int]) -> list[tuple[int, float]]:
    """(length, ms) at the grid's shortest, middle, next-to-longest and longest lengths. When the one
    below the longest already took PILOT_SLOW_MS, the longest is priced from the last two measured, by
    their log-log slope (held to [1, 2]: linear to quadratic growth): on a real-size model the longest
    prefill is tens of seconds that the sweep spends again (0.5B int4, one thread: 1024 -> 2048 tokens
    priced 21.5 s, measured 20.9)."""
    if not lengths:
        return []
    picks = sorted({lengths[0], lengths[len(lengths) // 2], *lengths[-2:]})
    measured: list[tuple[int, float]] = []
    for s in picks:
        if s == picks[-1] and len(measured) >= 2 and measured[-1][1] >= PILOT_SLOW_MS:
            (x0, y0), (x1, y1) = measured[-2], measured[-1]
            slope = float(np.clip(math.log(y1 / y0) / math.log(x1 / x0), 1.0, 2.0)) if y0 > 0 and x1 > x0 else 2.0
            measured.append((s, y1 * (s / x1) ** slope))
        else:
            measured.append((s, _price(runner, 0, s)))
    return measured


def _price(runner: Any, past_len: int, new_tokens: int) -> float:
    """One shape's price in ms: the median of PILOT_RUNS - 1 runs after a first that pays the shape change,
    or the first alone when it took PILOT_SLOW_MS or more (a real-size model's long prefill: seconds each,
    where the shape change is noise and two more runs would be most of the pilot)."""
    first = float(runner.time_step(past_len, new_tokens, 1)[0])
    if first >= PILOT_SLOW_MS:
        return first
    return float(np.median(runner.time_step(past_len, new_tokens, PILOT_RUNS - 1)))


# ------------------------------------------------------------------------------------------ allocation


@dataclass
class Allocation:
    """One target's window split over its phases, and the plan sized to it."""

    plan: Any  # the plan with this target's grid density, prefill reps and replay size
    requests: int  # replayed requests (0: none)
    batch_s: float = 0.0
    vision_s: float = 0.0
    sweep_s: float = 0.0
    replay_s: float = 0.0  # priced cost of the replay
    sweep_floor_s: float = 0.0  # MIN_ROUNDS of the sweep, priced: the replay stops before eating into it
    replay_floor_s: float = 0.0  # MIN_LOOP_REQUESTS replayed, priced: the replay's deadline is never earlier
    notes: list[str] = field(default_factory=list)  # what the budget changed, for the summary


def batch_floor_s(prices: Prices, plan: Any, tier: Any) -> float:
    """The batch sweep's MIN_ROUNDS over its shapes (it takes them budget or not), priced as B single steps
    at the batch's longest row: an upper bound (a batched step reads the weights once), so the phases after
    it are never promised time it will take."""
    from trt_latency.engines.batch_sweep import batch_shapes

    spec = plan.batch
    if spec is None:
        return 0.0
    shapes = batch_shapes(spec, tier.max_past_len, max(spec.sizes), plan.sweep.seed)
    return MIN_ROUNDS * (spec.warmup + 1) * sum(s.batch * prices.decode_ms(s.kv_max) for s in shapes) * 1e-3


def request_mix_seconds(prices: Prices, requests: list[Any]) -> float:
    return sum(prices.request_s(r.vision_tokens + r.text_tokens, r.output_tokens) for r in requests)


def allocate(prices: Prices, plan: Any, tier: Any, window_s: float | None, *, requests: int, exact: bool,
             batch: bool, vision: bool) -> Allocation:
    """Split ``window_s`` (None: no budget, the plan as it is) over this target's phases (module docstring).
    ``requests``: the plan's replay size (a cap), or with ``exact`` the user's --requests (kept as asked)."""
    from trt_latency.engines.replay import draw_requests
    from trt_latency.engines.sweep import decode_positions, prefill_lengths

    if window_s is None:
        return Allocation(plan=plan, requests=requests)
    w = max(window_s, 0.0)
    vision_s = VISION_SHARE * w if vision else 0.0
    batch_floor = batch_floor_s(prices, plan, tier) if batch else 0.0
    batch_s = max(BATCH_SHARE * w, batch_floor) if batch else 0.0
    notes: list[str] = []
    replay = plan.replay

    def mix(spec: Any) -> tuple[list[Any], float]:
        drawn = draw_requests(spec, requests, tier) if requests > 0 else []
        return drawn, request_mix_seconds(prices, drawn) / max(len(drawn), 1) if drawn else 0.0

    drawn, per = mix(replay)
    sweep = plan.sweep
    dec, pre = sweep.decode, sweep.prefill
    warm = sweep.warmups()
    cap = tier.max_past_len

    def round_s(log_points: int, linear_points: int) -> float:
        return sum((warm["decode"] + 1) * prices.decode_ms(p) for p in
                   decode_positions(cap, log_points, linear_points)) * 1e-3

    def sweep_with(lengths: list[int]) -> Any:
        return replace(sweep, prefill=replace(pre, lengths=tuple(lengths)))

    def prefill_round_s(lengths: list[int]) -> float:
        return sum((warm["prefill"] + 1) * prices.prefill_ms(s) for s in prefill_lengths(tier, sweep_with(lengths))) * 1e-3

    rest = w - vision_s - batch_s
    share = rest * (1 - REPLAY_SHARE) if requests > 0 else rest  # the sweep's share, before the replay is sized
    log_p, lin_p = dec.log_points, dec.linear_points
    while (share * (1 - PREFILL_SHARE) < MIN_USEFUL_ROUNDS * round_s(log_p, lin_p)
           and (log_p > MIN_LOG_POINTS or lin_p > MIN_LINEAR_POINTS)):
        log_p, lin_p = max(log_p - 1, MIN_LOG_POINTS), max(lin_p - 1, MIN_LINEAR_POINTS)
    if (log_p, lin_p) != (dec.log_points, dec.linear_points):
        notes.append(f"position grid {len(decode_positions(cap, log_p, lin_p))} positions, not "
                     f"{len(decode_positions(cap, dec.log_points, dec.linear_points))}: a step round costs "
                     f"{round_s(dec.log_points, dec.linear_points):.2f} s")
    # The prefill grid thins the same way (every other inner length; the longest is always kept, the grid
    # reaches the usable prompt): MIN_ROUNDS of seven long prefills is most of a real-size model's window.
    lengths = sorted(pre.lengths)
    while MIN_ROUNDS * prefill_round_s(lengths) > PREFILL_SHARE * share:
        thinner = [lengths[0], *lengths[1:-1][1::2], lengths[-1]]
        if len(thinner) < MIN_PREFILL_LENGTHS:  # 8 lengths thin to 5, not on to 3
            break
        lengths = thinner
    if tuple(lengths) != tuple(sorted(pre.lengths)):
        notes.append(f"prefill grid {len(prefill_lengths(tier, sweep_with(lengths)))} lengths, not "
                     f"{len(prefill_lengths(tier, sweep))}: a prefill round costs {prefill_round_s(list(pre.lengths)):.2f} s")
    pre_round = prefill_round_s(lengths)
    floor = MIN_ROUNDS * (round_s(log_p, lin_p) + pre_round)
    lo, hi = replay.output_tokens
    while (not exact and per > 0 and (w - vision_s - floor) / per < min(requests, MIN_REQUESTS)
           and hi > max(MIN_REPLAY_OUTPUT, lo)):
        hi = max(hi // 2, MIN_REPLAY_OUTPUT, lo)
        replay = replace(replay, output_tokens=(lo, hi))
        drawn, per = mix(replay)
    if replay.output_tokens != plan.replay.output_tokens:
        notes.append(f"replay outputs {lo}-{hi} tokens, not {lo}-{plan.replay.output_tokens[1]}: more requests over "
                     f"the prompt range for the loop terms (long KV comes from the sweep); {per:.2f} s each priced")
    # the requests the replay cannot go without are the first drawn ones (request i is the same for any n)
    replay_floor = request_mix_seconds(prices, drawn[:min(requests, MIN_LOOP_REQUESTS)]) if requests > 0 else 0.0
    if batch and rest - floor - replay_floor < 0:
        # The batch sweep checks batched admission; the sweep's floor and the loop terms are what every
        # prediction stands on. When the window cannot hold all three, the batch sweep goes, and says so.
        notes.append(f"batch sweep skipped: its {MIN_ROUNDS} rounds ({batch_floor:.0f} s) would leave less than the "
                     f"sweep's floor plus {min(requests, MIN_LOOP_REQUESTS)} replayed requests "
                     f"({floor + replay_floor:.0f} s) of a {w:.0f} s window")
        batch, batch_s = False, 0.0
        rest = w - vision_s
    need = floor + (replay_floor if requests > 0 else 0.0)
    if not exact and need > rest:
        # Said up front, not only in the summary's EXCEEDED line: the floors are what every prediction stands
        # on, so they run past the budget rather than leave a config without a fit or loop terms.
        notes.append(f"floors over the window: the sweep's {MIN_ROUNDS} rounds ({floor:.0f} s)"
                     + (f" and {min(requests, MIN_LOOP_REQUESTS)} replayed requests ({replay_floor:.0f} s)"
                        if requests > 0 else "")
                     + f" need {need:.0f} s of a {rest:.0f} s window: expect to finish about {need - rest:.0f} s "
                     "past --time-budget (raise it by that much to hold it)")
    n = requests
    replay_s = 0.0
    if requests > 0:
        if not exact:
            afford = int(REPLAY_SHARE * rest / per) if per > 0 else requests
            beside_floor = int(max(rest - floor, 0.0) / per) if per > 0 else requests
            n = int(min(max(min(max(afford, MIN_REQUESTS), beside_floor), MIN_LOOP_REQUESTS), requests))
            n -= n % 2  # even: the fit/holdout halves stay equal
            if n < requests:
                notes.append(f"replay {n} of the plan's {requests} requests ({per:.2f} s each priced)")
        replay_s = request_mix_seconds(prices, drawn[:n])
    sweep_s = max(rest - replay_s, 0.0)
    reps = pre.reps
    if pre_round > 0:
        reps = int(min(max(PREFILL_SHARE * sweep_s // pre_round, MIN_ROUNDS), pre.reps))
        if reps < pre.reps:
            notes.append(f"prefill reps {reps}, not {pre.reps}: a prefill round costs {pre_round:.2f} s")
    sized = replace(plan, sweep=replace(sweep, decode=replace(dec, log_points=log_p, linear_points=lin_p),
                                        prefill=replace(pre, reps=reps, lengths=tuple(lengths))),
                    batch=plan.batch if batch or plan.batch is None else None, replay=replay)
    return Allocation(plan=sized, requests=n, batch_s=batch_s, vision_s=vision_s, sweep_s=sweep_s, replay_s=replay_s,
                      sweep_floor_s=floor, replay_floor_s=request_mix_seconds(prices, drawn[:min(n, MIN_LOOP_REQUESTS)]),
                      notes=notes)


# ------------------------------------------------------------------------------------------ deadlines


def target_end(started: float, budget: float | None, targets_left: int, now: float | None = None) -> float | None:
    """A target's end (perf_counter): an equal share of what the budget leaves after the fit's reserve;
    a target that finishes early hands its rest on to the next."""
    if budget is None:
        return None
    now = time.perf_counter() if now is None else now
    left = budget - FIT_RESERVE_S - (now - started)
    return now + max(left, 0.0) / max(targets_left, 1)


# ------------------------------------------------------------------------------------------ ledger


@dataclass
class Overrun:
    phase: str
    seconds: float  # past the phase's deadline


@dataclass
class Ledger:
    """Seconds per phase (summed over targets) and each phase that ran past its deadline."""

    seconds: dict[str, float] = field(default_factory=dict)
    overruns: list[Overrun] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str, deadline: float | None = None, slack_s: float = 0.5, where: str = ""
              ) -> Iterator[None]:
        """Time ``name``; past ``deadline`` (perf_counter) by more than ``slack_s`` is an overrun (``where``:
        e.g. the config, for the summary)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            t1 = time.perf_counter()
            self.add(name, t1 - t0)
            if deadline is not None and t1 > deadline + slack_s:
                self.overruns.append(Overrun(f"{name} {where}".strip(), t1 - deadline))

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def merge(self, other: Ledger) -> None:
        for name, s in other.seconds.items():
            self.add(name, s)
        self.overruns.extend(other.overruns)
