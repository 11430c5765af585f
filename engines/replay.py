"""Runner + replay spec -> requests.csv: real end-to-end requests through the engine.

Each request: random vision/text/output lengths drawn from the plan (seeded, all drawn up front so
a resumed run replays exactly the same requests), random input embeddings, then
``runner.generate``: one prefill, then output_tokens - 1 decode steps that feed each step's present KV
back as the next past. One request-log row per request (estimator.requests format), flushed and
fsync'ed as it finishes; a rerun skips request_ids already in the file.

Several configs share one requests.csv: each replays under its own request_id range (``id_offset``,
e.g. config index * REPLAY_ID_STRIDE), drawing the same request mix by its index within the range.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from trt_latency.engines.base import Runner, draw_prompt
from trt_latency.engines.config import ReplaySpec, TierSpec
from trt_latency.errors import RequestLogError
from trt_latency.formats import done_requests
from trt_latency.schema import ConfigKey

# request_id offset between configs sharing one log: even, so every request keeps its even/odd
# (fit/holdout) side, and far above any plan's replay size.
REPLAY_ID_STRIDE = 1_000_000


@dataclass(frozen=True)
class ReplayRequest:
    request_id: int
    vision_tokens: int
    text_tokens: int
    output_tokens: int
    images: int = 1  # images the vision tokens come from (0 without vision tokens)


@dataclass(frozen=True)
class ReplayResult:
    path: Path
    rows_written: int
    rows_skipped: int
    seconds: float
    out_of_time: bool = False  # the deadline stopped it: the rest is left for a rerun into the same log
    rows_planned: int = 0


def random_prompt(runner: Runner, tokens: int, dtype: Any, rng: np.random.Generator) -> Any:
    """A prompt of ``tokens`` in the model's own input kind (runner.random_prompt): token ids for a token-id
    model, where vision tokens are prompt tokens like the text ones; random embeddings otherwise."""
    make = getattr(runner, "random_prompt", None)
    if make is not None:
        return make(tokens, rng)
    return draw_prompt(rng, tokens, hidden=runner.hidden, dtype=dtype)


def image_count(choices: tuple[int, ...], seed: int, index: int) -> int:
    """Images of request ``index`` with vision tokens: one of ``choices``, from a random stream of its own
    (so a plan's other draws, and the logs written before images existed, stay as they were)."""
    return int(np.random.default_rng([seed, 7927, index]).choice(np.asarray(choices)))


def _log_uniform(u: float, lo: int, hi: int) -> int:
    """The integer at quantile ``u`` of a log-uniform [lo, hi] (inclusive; lo 0 counts as 1, then clipped)."""
    a = max(lo, 1)
    return int(np.clip(np.floor(np.exp(np.log(a) + u * (np.log(hi + 1) - np.log(a)))), lo, hi)) if hi >= a else lo


def prompt_only(spec: ReplaySpec) -> ReplaySpec:
    """The mix for a decoder replayed without a vision chain: its vision tokens would only be more prompt
    tokens, so the prompt is one range, text low .. largest vision choice + text high, drawn on the text
    scale. Vision choices of 0 / 64 / 256 put two thirds of a text model's prompts at 64+ or 256+ tokens:
    its short prompts, where a constant loop term weighs most, went unmeasured (issue 24)."""
    if tuple(spec.vision_tokens) == (0,):
        return spec
    return replace(spec, vision_tokens=(0,), text_tokens=(spec.text_tokens[0], spec.max_prompt))


def mix_line(spec: ReplaySpec) -> str:
    """What a replay draws, in words (calibrate and the replay verb print it)."""
    vision = "" if tuple(spec.vision_tokens) == (0,) else f"vision tokens {list(spec.vision_tokens)} + "
    return (f"{vision}prompts of {spec.text_tokens[0]}-{spec.text_tokens[1]} tokens ({spec.text_scale}-uniform), "
            f"outputs of {spec.output_tokens[0]}-{spec.output_tokens[1]} (log-uniform), capped by the model's context")


def draw_requests(spec: ReplaySpec, n: int, tier: TierSpec | None = None) -> list[ReplayRequest]:
    """n requests: vision from the choices, text on ``spec.text_scale`` (log-uniform by default, or uniform),
    output log-uniform (inclusive ranges)."""
    lo, hi = spec.output_tokens
    choices = np.asarray(spec.vision_tokens, dtype=np.int64)
    reqs = []
    for i in range(n):
        # One generator per request id: request i is the same whichever n a (resumed) run asks for.
        rng = np.random.default_rng([spec.seed, 7919, i])
        v = int(rng.choice(choices))
        # Both scales draw the same stream (the log scale's quantile last), so a plan's outputs and vision
        # choices stay what they were whichever scale its text is drawn on.
        t = int(rng.integers(spec.text_tokens[0], spec.text_tokens[1] + 1))
        o = _log_uniform(rng.uniform(), lo, hi)
        u_text = rng.uniform()
        if spec.text_scale == "log":
            t = _log_uniform(u_text, *spec.text_tokens)
        if v + t == 0:
            t = 1  # a request needs at least one prompt token
        if tier is not None:
            t = max(1 if v == 0 else 0, min(t, tier.max_prefill_len - v))
            o = max(1, min(o, tier.max_past_len + 2 - v - t))
        k = image_count(spec.images, spec.seed, i) if v > 0 else 0
        reqs.append(ReplayRequest(i, v, t, o, k))
    return reqs


@runtime_checkable
class RequestSink(Protocol):
    """Where a replay's request rows go and which request_ids are done (``FileRequestSink``: requests.csv)."""

    path: Path

    def done(self) -> dict[int, tuple[int, int, int] | None]:
        """request_id -> its config (None where the log has no config columns), as ``done_requests``."""
        ...

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Request-log rows (schema.REQUEST_COLUMNS plus metadata), made durable before returning."""
        ...


class FileRequestSink:
    """requests.csv as a RequestSink (``done_requests`` / ``schema.append_requests``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def done(self) -> dict[int, tuple[int, int, int] | None]:
        return done_requests(self.path)

    def append(self, rows: list[dict[str, Any]]) -> None:
        from trt_latency.formats import append_requests

        append_requests(self.path, rows)


def run_replay(runner: Runner, key: ConfigKey, tier: TierSpec, spec: ReplaySpec,
               requests_path: str | os.PathLike[str] | RequestSink, n: int | None = None, progress: bool = True,
               id_offset: int = 0, chain: Any = None, deadline: float | None = None) -> ReplayResult:
    """Replay ``n`` (default spec.requests) requests; append one row per request to ``requests_path``.

    Request i of this config is written as request_id ``id_offset + i``. A request_id already in the
    log is skipped when its row is this config's; a row of another config there means the log was
    written by a different plan (RequestLogError: appending would make the ids ambiguous).
    ``requests_path`` may be a ``RequestSink`` (rows streamed elsewhere, e.g. to a Ray driver).
    ``deadline`` (time.perf_counter): no request starts after it; the ones done are kept (each row is
    durable as it is written) and a rerun into the same log replays the rest."""
    sink = requests_path if isinstance(requests_path, RequestSink) else FileRequestSink(requests_path)
    path = sink.path
    count = spec.requests if n is None else n
    if id_offset < 0 or id_offset % 2:
        raise ValueError(f"id_offset must be even and >= 0 (it keeps each request's fit/holdout side), got {id_offset}")
    requests = [replace(r, request_id=id_offset + r.request_id) for r in draw_requests(spec, count, tier)]
    done = sink.done()
    mine = tuple(key)
    for r in requests:
        other = done.get(r.request_id, mine)
        if other is not None and other != mine:
            raise RequestLogError("request_id already used by another config", path=str(path),
                                  field="request_id", expected=f"request {r.request_id} of config {mine} or none",
                                  got=f"a row of config {other} (a log from a different plan: use a new output)")
    todo = [r for r in requests if r.request_id not in done]
    dtype = np.float16 if tier.dtype == "float16" else np.float32
    from trt_latency.engines.sweep import progress_bar

    bar = progress_bar(len(todo), f"replay t{key.tier_idx}.k{key.top_k}.b{key.num_active_blocks}",
                       progress and bool(todo), unit="request")
    t_start = time.perf_counter()
    written = 0
    out_of_time = False
    try:
        for req in todo:
            if deadline is not None and time.perf_counter() >= deadline:
                out_of_time = True
                break
            rng = np.random.default_rng([spec.seed, req.request_id])
            embeds = random_prompt(runner, req.vision_tokens + req.text_tokens, dtype, rng)
            before = 0.0
            if chain is not None and req.vision_tokens > 0:
                embeds, timing = chain.prompt(runner, req.vision_tokens, req.text_tokens, req.images, rng)
                before = timing.before_prefill_ms
            res = runner.generate(embeds, req.output_tokens)
            if before:
                res = replace(res, ttft_ms=res.ttft_ms + before, total_ms=res.total_ms + before)
            sink.append([{
                "request_id": req.request_id, "vision_tokens": req.vision_tokens, "text_tokens": req.text_tokens,
                "output_tokens": req.output_tokens, "tier_idx": key.tier_idx, "top_k": key.top_k,
                "num_active_blocks": key.num_active_blocks, "ttft_ms": round(res.ttft_ms, 6),
                "total_ms": round(res.total_ms, 6), "images": req.images,
                "first_step_ms": round(res.step_ms[0], 6) if res.step_ms else "",
                "backend": runner.backend, "device": runner.device,
            }])
            written += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return ReplayResult(path=path, rows_written=written, rows_skipped=len(requests) - len(todo),
                        seconds=time.perf_counter() - t_start, out_of_time=out_of_time, rows_planned=len(requests))
