"""`trt-latency sweep`: time decode steps per KV position and prefill per length into samples.csv."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trt_latency.cli._model import ModelOptions, add_model_args, backend_choices, model_options
from trt_latency.cli.export import add_config_args, ensure_model, resolve_key

EXAMPLE = """\
examples:
  trt-latency sweep --out runs/samples.csv                 # primary config of the default plan
  trt-latency sweep --all --out runs/samples.csv           # every config of the plan
  trt-latency sweep plan.yaml --onnx my.onnx --tier 0 --blocks 8 --backend ort-cuda --out s.csv
  trt-latency sweep --quick --out s.csv                    # the plan's quick grid
  trt-latency sweep --onnx genai/model.onnx --kv-mode shared --max-past-len 1024 --out s.csv

Rows are appended as measured; rerunning the same command after an interruption measures only
the missing rows. Exported models go next to the samples file (model.tT.kK.bB.onnx, calibrate's naming)
and are reused.
"""


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--onnx", metavar="F", help="time this ONNX decoder instead of exporting the plan's model")
    source.add_argument("--engine", metavar="F", help="time this serialized TensorRT engine (backend tensorrt)")
    parser.add_argument("--backend", choices=backend_choices(), default="auto",
                        help="runtime (default auto: TensorRT, else ONNX Runtime CUDA if it loads, else CPU)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="ONNX Runtime intra-op threads (default: the plan's runtime.intra_op_threads)")
    parser.add_argument("--quick", action="store_true", help="use the plan's quick: overrides")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(parser)


def open_for(plan: Any, key: Any, args: argparse.Namespace, model_dir: Path) -> Any:
    """Runner for ``key``: the given --onnx/--engine, else the plan's model exported into model_dir."""
    from trt_latency.engines.backends import open_runner

    tier = plan.tier(key.tier_idx)
    backend = "tensorrt" if args.engine else args.backend
    if args.engine:
        path = Path(args.engine)
    elif args.onnx:
        path = Path(args.onnx)
    else:
        from trt_latency.pipeline import model_path

        path = ensure_model(model_path(model_dir, key), tier, key)
    threads = plan.runtime.intra_op_threads if args.threads is None else args.threads
    # The runner caps both at what the model supports (its context length from its config).
    max_past = args.max_past_len if args.max_past_len is not None else tier.max_past_len
    return open_runner(path, backend, threads=threads, inter_threads=plan.runtime.inter_op_threads,
                       max_past_len=max_past, max_new_tokens=tier.max_prefill_len,
                       huge_pages=plan.runtime.huge_pages, **model_options(args))


def plan_for_onnx(plan: Any, args: argparse.Namespace) -> Any:
    """With --onnx (and no --tier / --index): the plan narrowed to the user's model, its tier and config read
    from the model's signature exactly as `calibrate --onnx` reads them (one check for every verb)."""
    if not args.onnx or args.tier is not None or args.index is not None:
        return plan
    from dataclasses import replace

    from trt_latency.pipeline import tier_from_onnx

    tier, key, _ = tier_from_onnx(Path(args.onnx), plan, ModelOptions.from_namespace(args))
    return replace(plan, tiers={tier.tier_idx: tier}, configs=[key])


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "sweep", help="time decode steps per KV position (and prefill per length) into samples.csv",
        description="Measure per-position step latency of one config (or all with --all) on the chosen backend; "
                    "positions on a log + linear grid, warm-up, shuffled interleaved order, resumable.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--all", action="store_true", help="sweep every config of the plan")
    add_runtime_args(parser)
    parser.add_argument("--out", default="samples.csv", metavar="F", help="samples CSV (default samples.csv)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trt_latency.engines.adaptive import describe
    from trt_latency.engines.config import load_plan
    from trt_latency.engines.sweep import run_sweep
    from trt_latency.errors import ConfigError
    from trt_latency.estimator.refine import LopoRefiner

    plan = load_plan(args.config, quick=args.quick)
    if args.all and (args.onnx or args.engine or args.tier is not None or args.index is not None):
        raise ConfigError(field="--all", expected="--all without --onnx/--engine/--tier/--index")
    plan = plan_for_onnx(plan, args)
    keys = plan.configs if args.all else [resolve_key(plan, args)]
    out = Path(args.out)
    for key in keys:
        with open_for(plan, key, args, out.parent) as runner:
            # The fit says where more rounds matter (adaptive plans; the fixed plan ignores it).
            res = run_sweep(runner, key, plan, out, progress=not args.no_progress, refiner=LopoRefiner())
        print(f"config {tuple(key)} on {runner.backend} ({runner.device}, kv_mode "
              f"{getattr(runner, 'kv_mode', 'concat')}): {res.rows_written} rows measured, "
              f"{res.rows_skipped} already present, {len(res.positions)} decode positions "
              f"{res.positions[0]}..{res.positions[-1]}, prefill {list(res.prefill_lengths)}, {res.seconds:.1f} s "
              f"-> {out}")
        print(describe(res.states, plan.sweep.adaptive, plan.sweep.warmups()))
    return 0
