"""`trt-latency replay`: real end-to-end requests (prefill + decode loop) into a request log."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from trt_latency.cli.export import add_config_args, resolve_key
from trt_latency.cli.sweep import add_runtime_args, open_for, plan_for_onnx

EXAMPLE = """\
examples:
  trt-latency replay -n 50 --out runs/requests.csv        # primary config of the default plan
  trt-latency replay plan.yaml --onnx my.onnx -n 200 --out requests.csv
  trt-latency analyze runs/requests.csv -c runs/calibration.yaml   # then compare with the model

Each request: random prompt/output lengths from the plan's replay: section (seeded; a vision choice
counts as prompt tokens, there is no encoder here), random input ids or embeddings, one prefill, then a
decode loop feeding each step's present KV back as past.
Rerunning continues: request_ids already in the file are skipped.
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "replay", help="run real end-to-end requests through the engine into a request log (requests.csv)",
        description="Replay seeded random requests (vision + text prompt, output length) end to end and log "
                    "ttft_ms and total_ms per request in the request-log format analyze reads.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_runtime_args(parser)
    parser.add_argument("-n", "--requests", type=int, default=None, metavar="N",
                        help="number of requests (default: the plan's replay.requests)")
    parser.add_argument("--out", default="requests.csv", metavar="F", help="request log CSV (default requests.csv)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trt_latency.engines.config import load_plan
    from trt_latency.engines.replay import mix_line, prompt_only, run_replay
    from trt_latency.errors import ConfigError

    plan = load_plan(args.config, quick=args.quick)
    if args.requests is not None and args.requests < 1:
        raise ConfigError(field="--requests", expected="an integer >= 1", got=args.requests)
    plan = plan_for_onnx(plan, args)
    key = resolve_key(plan, args)
    out = Path(args.out)
    with open_for(plan, key, args, out.parent) as runner:
        # Requests never run past what the runner (the model) supports.
        tier = plan.tier(key.tier_idx)
        tier = replace(tier, max_past_len=min(tier.max_past_len, runner.max_past_len),
                       max_prefill_len=min(tier.max_prefill_len, getattr(runner, "max_new_tokens",
                                                                         tier.max_prefill_len)))
        spec = prompt_only(plan.replay)  # no vision chain here: a vision choice would be more prompt tokens
        print(f"replay: {mix_line(spec)}")
        res = run_replay(runner, key, tier, spec, out, args.requests, progress=not args.no_progress)
    print(f"config {tuple(key)} on {runner.backend} (kv_mode {getattr(runner, 'kv_mode', 'concat')}): "
          f"{res.rows_written} requests replayed, {res.rows_skipped} already present, {res.seconds:.1f} s -> {out}")
    return 0
