"""calibrate's report text: the per-position table, the fit's lines, the serving-loop and conformal lines,
and the summary's closing lines (where the time went, what a larger budget would buy, what is
extrapolated). Formatting only: the numbers come from trt_latency/pipeline.py and trt_latency/budget.py."""

from __future__ import annotations

from typing import Any

import numpy as np


def key_name(key: Any) -> str:
    t, k, b = (int(x) for x in key)
    return f"t{t}.k{k}.b{b}"


def position_table(samples: Any, cal: Any) -> str:
    """Per config: past_len, reps, measured median and p90, fitted value, relative error."""
    from trt_latency.estimator.fit import decode_latencies, decode_rows
    from trt_latency.estimator.model import Estimator

    est = Estimator(cal)
    lines: list[str] = []
    for cfg in cal.configs:
        # The medians the fit used (the machine's drift divided out: estimator.fit.drift_adjusted); p90 raw.
        rows = decode_rows(samples, cfg.key)
        past, lat, _ = decode_latencies(samples, rows)
        raw = samples.latency_ms[rows]
        lines.append(f"config tier_idx={cfg.tier_idx} top_k={cfg.top_k} num_active_blocks={cfg.num_active_blocks}")
        lines.append(f"  {'past_len':>8}  {'reps':>4}  {'median ms':>10}  {'p90 ms':>9}  {'fitted ms':>10}  {'fit err':>8}")
        for p in np.unique(past):
            y = lat[past == p]
            med = float(np.median(y))
            fitted = float(est.decode_step_ms(int(p), tier_idx=cfg.tier_idx, top_k=cfg.top_k,
                                              num_active_blocks=cfg.num_active_blocks, serving=False))
            lines.append(f"  {int(p):>8}  {y.size:>4}  {med:>10.4f}  {float(np.quantile(raw[past == p], 0.9)):>9.4f}  "
                         f"{fitted:>10.4f}  {(fitted - med) / med:>+8.1%}")
        lines.append(fit_summary(cfg))
        lines.append("")
    return "\n".join(lines)


def fit_summary(cfg: Any) -> str:
    knots = [float(k) for k in cfg.decode_knots]
    values = [float(v) for v in cfg.decode_values_ms]
    slopes = [(values[i + 1] - values[i]) / (knots[i + 1] - knots[i]) * 1e3 for i in range(len(knots) - 1)]
    overall = (values[-1] - values[0]) / (knots[-1] - knots[0]) * 1e3
    err = cfg.fit_error or {}
    loo_med, loo_max = err.get("loo_median_rel"), err.get("loo_max_rel")
    a, b, c = (float(x) for x in cfg.prefill_coeffs)
    parts = [
        "  fit: " + f"{len(knots)} knots at past_len " + ", ".join(f"{k:.0f}" for k in knots),
        "       T(L) at knots (ms): " + ", ".join(f"{v:.4f}" for v in values),
        f"       slope {overall:.3f} us per KV token overall (per segment: "
        + ", ".join(f"{s:.3f}" for s in slopes) + ")",
    ]
    if isinstance(loo_med, int | float) and isinstance(loo_max, int | float):
        within, total = err.get("loo_within_2se"), err.get("loo_with_se")
        noise = (f"; {within} of {total} within 2 SE of their own median (the rest: model error or a shift "
                 f"that more rounds would not remove)" if isinstance(within, int) and total else "")
        parts.append(f"       leave-one-position-out error: median {loo_med:.1%}, max {loo_max:.1%}"
                     f" over {err.get('n_positions', '?')} positions{noise}")
    drift = err.get("drift_sd_rel")
    if isinstance(drift, int | float) and drift > 0:
        parts.append(f"       machine drift divided out of the medians: {drift:.1%} robust sd over the sweep "
                     "(the level all positions shared at the time)")
    parts.append(f"       prefill(S) = {a:.4f} + {b:.3e}*S + {c:.3e}*S^2 ms")
    if cfg.kv_bytes_per_token:
        line = f"       KV cache: {cfg.kv_bytes_per_token} bytes per token"
        if overall > 0:
            ms_per_mib = overall * 1e-3 / cfg.kv_bytes_per_token * 2**20
            line += (f"; slope = {ms_per_mib:.3f} ms per MiB of KV "
                     f"(an effective {2**20 / (ms_per_mib * 1e-3) / 1e9:.1f} GB/s if it were all KV reads)")
        parts.append(line)
    return "\n".join(parts)


def fmt_time(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"



LOOP_HEADER = ("  serving loop: total(n) = prefill + o_p + [n>=2] c(P) + sum (T_engine + o); terms fitted on the "
               "even request_ids of each config, checked on the odd ones")


def loop_rows(configs: list[Any], reports: dict[Any, Any]) -> list[str]:
    """One line per config: its terms and where they come from (c(P)'s slope and clamped terms: loop_note)."""
    from trt_latency.estimator.fit import loop_note

    lines = [f"    {'config':<9} {'o ms/step':>9} {'c ms once':>9} {'o_p ms':>8}  source"]
    for c in configs:
        lp = c.serving_loop
        if lp is None:
            lines.append(f"    {key_name(c.key):<9} {'-':>9} {'-':>9} {'-':>8}  none (no replay): engine-only")
            continue
        src = lp.source
        r = reports.get(c.key)
        if lp.source == "replay":
            src = f"replay ({lp.n_requests} requests)"
        elif lp.source == "none":
            src = f"none (only {r.n_fit if r else 0} fit requests): zero"
        else:
            src = f"{lp.source} ({lp.n_requests} requests there)"
        lines.append(f"    {key_name(c.key):<9} {lp.decode_step_ms:>9.4f} {lp.first_step_ms:>9.4f} "
                     f"{lp.prefill_ms:>8.4f}  {src}{loop_note(lp)}")
    return lines


def no_log_lines() -> list[str]:
    """No request log at all: nothing to fit or borrow; say so in one line."""
    return ["  serving loop: no replayed requests: engine-only predictions, no conformal factors "
            "(admit(alpha=...) uses the residual quantiles)"]


def holdout_lines(configs: list[Any], reports: dict[Any, Any]) -> list[str]:
    lines = ["  held-out total time, median |measured/predicted - 1|: engine-only -> with loop terms "
             "(decode part alone; median measured/predicted)"]
    for c in configs:
        r = reports.get(c.key)
        if r is None or r.n_holdout == 0:
            lines.append(f"    {key_name(c.key):<9} no held-out requests")
            continue
        lines.append(f"    {key_name(c.key):<9} {r.n_holdout:>4} requests: {r.holdout_median_rel_engine:6.1%} -> "
                     f"{r.holdout_median_rel_serving:6.1%}  (decode {r.holdout_decode_median_rel_engine:6.1%} -> "
                     f"{r.holdout_decode_median_rel_serving:6.1%}; ratio {r.holdout_median_ratio_engine:.3f} -> "
                     f"{r.holdout_median_ratio_serving:.3f})")
    return lines


def conformal_lines(configs: list[Any], fits: dict[Any, Any]) -> list[str]:
    lines = ["  conformal factors (each config's odd request_ids, against its serving prediction)"]
    for c in configs:
        f = fits.get(c.key)
        if f is None:
            lines.append(f"    {key_name(c.key):<9} none (no held-out requests of its own): admit(alpha=...) "
                         "uses the residual quantiles")
            continue
        shown = ", ".join(f"{a:g}: {v:.3f}" if np.isfinite(v) else f"{a:g}: n/a"
                          for a, v in zip(f.alphas, f.factors, strict=True))
        lines.append(f"    {key_name(c.key):<9} n = {f.n:>4}, alpha -> factor  {shown}")
    return lines


def extrapolation_lines(reach: dict[str, dict[str, int]]) -> list[str]:
    """Per config: how far the sweep measured vs the longest replayed request, flagged where a prediction
    there is extrapolated. ``reach``: config name -> {decode_max, prefill_max, prompt_max, kv_max}."""
    lines = []
    for name, r in reach.items():
        text = (f"  measured     {name}: decode steps at KV up to {r['decode_max']}, prefill up to {r['prefill_max']} "
                f"tokens; the replay's mix reaches prompts of {r['prompt_max']}, KV {r['kv_max']}")
        beyond = []
        if r["prompt_max"] > r["prefill_max"]:
            beyond.append(f"prompts above {r['prefill_max']}")
        if r["kv_max"] > r["decode_max"]:
            beyond.append(f"KV above {r['decode_max']}")
        lines.append(text + (f" (EXTRAPOLATED: {', '.join(beyond)})" if beyond else ""))
    return lines


def time_lines(budget: float | None, wall: float, seconds: dict[str, float], overruns: list[Any],
               more: list[str]) -> list[str]:
    """The summary's end: seconds per phase, whether and where the budget was exceeded, what more buys."""
    order = ("export", "pilot", "batch sweep", "sweep", "replay", "vision", "fit", "plot", "loop terms")
    names = [n for n in order if n in seconds] + sorted(n for n in seconds if n not in order)
    other = max(wall - sum(seconds.values()), 0.0)
    parts = [f"{n} {fmt_time(seconds[n])}" for n in names] + [f"other {fmt_time(other)}"]
    lines = ["Where the time went: " + ", ".join(parts) + f" (wall {fmt_time(wall)})"]
    if budget is not None:
        if wall > budget:
            where = ", ".join(f"{o.phase} +{o.seconds:.1f} s" for o in overruns) or "start-up and the summary"
            lines.append(f"  budget       EXCEEDED: {fmt_time(wall)} of --time-budget {fmt_time(budget)} "
                         f"(+{wall - budget:.1f} s; past its deadline: {where})")
        else:
            lines.append(f"  budget       held: {fmt_time(wall)} of --time-budget {fmt_time(budget)}")
    if more:
        lines.append("A larger --time-budget would buy:")
        lines.extend(f"  {m}" for m in more)
    return lines
