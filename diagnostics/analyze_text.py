"""analyze's words: the verdict of each check and the printed report, apart from the numbers.

diagnostics.analyze computes (bucket means, the growth and its share, slopes, tercile deltas); the
functions here turn those numbers into the sentences stored in each check's ``verdict`` and into the
text table ``analyze`` prints. Nothing here computes a statistic.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from trt_latency.diagnostics.buckets import SIGNIFICANCE_SE

if TYPE_CHECKING:
    from trt_latency.diagnostics.analyze import AnalysisReport, GrowthShare

NO_PREFILL_PAIRS = "No output-length bucket has both short and long prompts; cannot compare."


def share_text(g: GrowthShare) -> str:
    """The KV-explained share in words (n/a with the reason where it is not defined)."""
    if math.isfinite(g.share):
        return f"{g.share:.0%}"
    if g.significant is False:
        return "n/a (no significant growth)"
    if g.measured_growth <= 0:
        return "n/a (measured ms/token falls)"
    return "n/a"


def growth_verdict(first: str, last: str, g: float, se: float, significant: bool | None, p: float,
                   p_model: float, share_raw: float, share: float, has_model: bool, with_loop: bool) -> str:
    """The growth from bucket ``first`` to ``last`` in words: measured g (standard error se), the model's
    engine-only p and, with serving-loop terms, p_model; the KV-explained share (raw and clamped)."""
    span = f"from {first} to {last} output tokens"
    if not has_model:
        verdict = (f"Measured decode ms/token changes by {g:+.3f} {span}. Pass the calibration (-c CAL) to see "
                   "how much of it KV-cache growth explains.")
    elif significant is False:
        verdict = (f"Measured decode ms/token does not change significantly {span} ({g:+.3f} ms/token, within "
                   f"{SIGNIFICANCE_SE:g} standard errors = {SIGNIFICANCE_SE * se:.3f}); there is no growth for the "
                   f"KV cache to explain (the model predicts {p:+.3f} ms/token from KV growth alone).")
    elif g < 0:
        verdict = (f"Measured decode ms/token falls by {-g:.3f} {span}; a longer KV cache can only make later "
                   f"steps slower (the model predicts {p:+.3f}), so the KV cache cannot explain this change. A first "
                   "decode step that costs more than later ones (warm-up after prefill, a shape change) weighs most "
                   "in short requests and shows up this way.")
        if with_loop:
            fits = math.isfinite(se) and abs(p_model - g) <= SIGNIFICANCE_SE * se
            verdict += (f" With the calibrated serving-loop terms (first-step transient c, per-step o) the model "
                        f"predicts {p_model:+.3f} ms/token"
                        + (": they account for the fall." if fits else ", which does not match the measured fall."))
    elif share_raw >= 0.8:
        extra = (f" (the model predicts {share_raw:.0%} of it, more than measured; clamped to 100%)"
                 if share_raw > 1.0 else "")
        verdict = (f"KV-cache growth explains {share:.0%} of the measured growth {span} "
                   f"(model {p:+.3f} vs measured {g:+.3f} ms/token){extra}.")
    elif share_raw >= 0.5:
        verdict = (f"KV-cache growth explains {share:.0%} of the measured growth {span}; the remaining "
                   f"{g - p:+.3f} ms/token ({1 - share:.0%}) comes from something the per-position model does "
                   "not see.")
    else:
        verdict = (f"The KV cache cannot explain this growth: it accounts for only {share:.0%} of it "
                   f"(model {p:+.3f} vs measured {g:+.3f} ms/token {span}). The other {g - p:+.3f} ms/token comes "
                   "from something the per-position engine timing does not include: per-request overhead in the "
                   "decode loop, batching or contention with other requests, host-side sampling or scheduling.")
    if significant is None:
        verdict += " (Too few requests in the first or last bucket to test significance.)"
    return verdict


def kv_verdict(n: int, r: float, slope: float, pslope: float, t_stat: float, has_model: bool) -> str:
    """Check (a) in words: the measured slope of ms/token on KV size (correlation r, its t statistic over n
    requests) against the model's slope pslope on the same requests."""
    if not math.isfinite(slope):
        verdict = "All requests have the same KV size; nothing to compare."
    elif not math.isfinite(t_stat) or abs(t_stat) < SIGNIFICANCE_SE:
        verdict = (f"Decode ms/token shows no clear relation to KV size (r = {r:+.2f} over {n} requests, "
                   "not significant): the KV cache is not what drives the per-request differences in this log.")
    elif slope > 0:
        strength = "strongly" if r >= 0.7 else "moderately" if r >= 0.4 else "weakly"
        verdict = f"Decode ms/token rises {strength} with KV size (r = {r:+.2f})."
        if has_model and math.isfinite(pslope) and pslope > 0:
            ratio = slope / pslope
            if 0.5 <= ratio <= 2.0:
                verdict += f" The measured slope is {ratio:.2f}x the engine's per-position slope: consistent."
            elif ratio > 2.0:
                verdict += (f" But the measured slope is {ratio:.1f}x the engine's per-position slope: KV reads "
                            "alone do not account for it (a confounder that grows with KV size, e.g. longer "
                            "requests sharing the engine with more concurrent work).")
            else:
                verdict += (f" The measured slope is only {ratio:.2f}x the engine's per-position slope: "
                            "something offsets the KV cost in this log.")
    else:
        verdict = (f"Decode ms/token falls as KV size grows (r = {r:+.2f}): the opposite of what KV reads cause, "
                   "so the KV cache does not explain the differences.")
    return verdict


def prefill_verdict(delta: float, se: float, pdelta: float, has_model: bool) -> str:
    """Check (b) in words: longest - shortest prompt tercile at fixed output length, measured delta
    (standard error se) against the model's pdelta."""
    model = f" (model {pdelta:+.3f})" if has_model else ""
    if not math.isfinite(se):
        verdict = (f"Longest - shortest prompt tercile at fixed output length: {delta:+.3f} ms/token{model}; too few "
                   "requests per cell to test significance.")
    elif abs(delta) <= SIGNIFICANCE_SE * se:
        verdict = (f"At fixed output length, prompt length makes no significant difference ({delta:+.3f} ms/token, "
                   f"2 SE = {SIGNIFICANCE_SE * se:.3f}).")
        if has_model and abs(pdelta) <= SIGNIFICANCE_SE * se:
            verdict += (f" The engine predicts {pdelta:+.3f}, also within the noise: this log is too small or "
                        "too noisy to show a KV effect of that size.")
        else:
            verdict += " In this log the KV length set by the prompt does not drive decode latency."
    elif delta > 0:
        verdict = (f"At fixed output length, requests with the longest prompts decode {delta:.3f} ms/token slower "
                   f"than those with the shortest{model}: the KV length set by the prompt costs decode time.")
        if has_model and pdelta > 0 and delta / pdelta > 2.0:
            verdict += (f" The difference is {delta / pdelta:.1f}x what the engine's per-position cost predicts, "
                        "so KV reads explain only part of it.")
    else:
        verdict = (f"At fixed output length, requests with the longest prompts decode {-delta:.3f} ms/token faster"
                   f"{model}: the opposite of a KV-cache effect.")
    return verdict


def format_analysis(report: AnalysisReport) -> str:
    """The printed report: the bucket table, the loop terms, the level, growth, checks (a) and (b), causes, notes."""
    lines: list[str] = []
    lines.append(f"Request log: {report.path} ({report.n_requests} requests, {report.n_decode} with >= 2 output tokens)")
    if report.source.get("calibration"):
        lines.append(f"Calibration: {report.source['calibration']}")
    lines.append("")
    loop = report.has_model and bool(report.serving_loop)
    header = f"{'output tokens':>13}  {'n':>5}  {'measured ms/token':>19}  {'mean KV len':>11}"
    if report.has_model:
        header += f"  {'predicted ms/token':>19}  {'pred/meas':>9}"
    if loop:
        header += f"  {'engine only':>11}"
    lines.append(header)
    lines.append("-" * len(header))
    for b in report.buckets:
        if b.count == 0:
            row = f"{b.label:>13}  {0:>5}  {'-':>19}  {'-':>11}"
            if report.has_model:
                row += f"  {'-':>19}  {'-':>9}"
            if loop:
                row += f"  {'-':>11}"
        else:
            row = (f"{b.label:>13}  {b.count:>5}  {_pm(b.measured_mean, b.measured_std):>19}"
                   f"  {b.mean_kv_tokens:>11.0f}")
            if report.has_model:
                ratio = b.predicted_mean / b.measured_mean if b.measured_mean > 0 else math.nan
                row += f"  {_pm(b.predicted_mean, b.predicted_std):>19}  {ratio:>9.2f}"
            if loop:
                row += f"  {b.engine_mean:>11.3f}"
        lines.append(row)
    lines.append("")
    if loop:
        lines.append("Predicted = engine per-position model + serving-loop terms (from the calibration):")
        for key, t in sorted(report.serving_loop.items()):
            slope = f" + {t['first_step_per_token_ms']:.3g} ms * P" if t.get("first_step_per_token_ms") else ""
            pre_slope = f" + {t['prefill_per_token_ms']:.3g} ms * P" if t.get("prefill_per_token_ms") else ""
            clamped = f"; clamped at 0: {', '.join(t['clamped'])}" if t.get("clamped") else ""
            lines.append(f"  config ({key}): o = {t['decode_step_ms']:.4f} ms per decode step, c = "
                         f"{t['first_step_ms']:.4f}{slope} ms once after the prefill, o_p = {t['prefill_ms']:.4f}{pre_slope} ms "
                         f"on the prefill ({t['source']}, {t['n_requests']} requests{clamped})")
        lines.append(_wrap(f"Loop share: the serving-loop terms are {report.loop_share_decode:.1%} of the predicted "
                           f"decode time and {report.loop_share_total:.1%} of the predicted total time of these "
                           "requests."))
        lines.append("")
    if report.has_model and math.isfinite(report.level_ratio):
        what = "the model's prediction (engine + serving loop)" if loop else "the engine's per-position prediction"
        text = f"Level: the requests decode at {report.level_ratio:.2f}x {what} overall"
        if loop and math.isfinite(report.engine_level_ratio):
            text += f" ({report.engine_level_ratio:.2f}x the engine-only prediction)"
        lines.append(_wrap(text + "." + (LEVEL_HINT if abs(report.level_ratio - 1.0) > 0.2 else "")))
        lines.append("")
    if report.growth is not None:
        g = report.growth
        lines.append(f"Growth {g.first} -> {g.last}: measured {g.measured_growth:+.3f} ms/token "
                     f"(2 SE = {SIGNIFICANCE_SE * g.measured_se:.3f})"
                     + (f", model {g.predicted_growth + (g.loop_growth if math.isfinite(g.loop_growth) else 0.0):+.3f}"
                        " ms/token" if report.has_model else ""))
        if report.has_model and math.isfinite(g.loop_growth):
            lines.append(f"  of the model's growth: KV (engine) {g.predicted_growth:+.3f}, serving loop "
                         f"{g.loop_growth:+.3f} ms/token (the one-off c weighs most on short requests)")
        if report.has_model:
            lines.append("KV-explained share of the growth: " + g.share_text())
        lines.append(_wrap("Verdict: " + g.verdict))
        lines.append("")
    if report.kv_check is not None:
        k = report.kv_check
        lines.append(f"Check (a) decode ms/token vs KV size ({k.n} requests, x = mean KV {k.x_unit} per step):")
        line = (f"  correlation r = {k.correlation:+.2f}, slope = {k.slope_ms_per_unit:+.4g} ms/token per "
                f"{k.x_unit}, intercept = {k.intercept_ms:.3f} ms")
        lines.append(line)
        if report.has_model:
            lines.append(f"  model slope on the same requests = {k.predicted_slope_ms_per_unit:+.4g} ms/token per {k.x_unit}")
        if math.isfinite(k.implied_bandwidth_gb_s):
            lines.append(f"  implied KV read rate = {k.implied_bandwidth_gb_s:.1f} GB/s "
                         "(compare with the device's memory bandwidth)")
        lines.append(_wrap("  " + k.verdict, indent="  "))
        lines.append("")
    if report.prefill_check is not None:
        pc = report.prefill_check
        edges = ", ".join(f"{e:.0f}" for e in pc.tercile_edges)
        lines.append(f"Check (b) decode ms/token at fixed output length across prompt-length terciles (edges {edges}):")
        head = f"  {'output tokens':>13}  {'prompt':>12}  {'n':>4}  {'mean P':>7}  {'measured':>17}"
        if report.has_model:
            head += f"  {'predicted':>9}"
        lines.append(head)
        for c in pc.cells:
            row = (f"  {c.bucket:>13}  {c.tercile:>12}  {c.count:>4}  {c.mean_prompt_tokens:>7.0f}"
                   f"  {_pm(c.measured_mean, c.measured_std):>17}")
            if report.has_model:
                row += f"  {c.predicted_mean:>9.3f}"
            lines.append(row)
        summary = f"  longest - shortest prompt tercile: measured {pc.mean_delta_ms:+.3f} ms/token (2 SE = {SIGNIFICANCE_SE * pc.mean_delta_se:.3f})"
        if report.has_model:
            summary += f", model {pc.predicted_delta_ms:+.3f}"
        lines.append(summary)
        lines.append(_wrap("  " + pc.verdict, indent="  "))
        lines.append("")
    if report.causes is not None:
        lines.append(report.causes.format_table())
    for note in report.notes:
        lines.append(_wrap("Note: " + note))
    return "\n".join(lines).rstrip() + "\n"


LEVEL_HINT = (" The gap is not KV growth (the prediction includes it): it is time per token the per-position "
               "sweep did not see, e.g. work between engine calls, other load on the device while the log was "
               "recorded, or heavy-tailed step times (a request's total follows the mean step time, the fitted "
               "model the typical one; see residual_quantiles in the calibration).")


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f}"


def _wrap(text: str, width: int = 100, indent: str = "") -> str:
    import textwrap

    return textwrap.fill(text, width=width, subsequent_indent=indent + "  ")
