"""`trt-latency export`: plan YAML + config -> model.onnx (reference decoder with explicit KV bindings)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trt_latency.errors import ConfigError

EXAMPLE = """\
examples:
  trt-latency export -o model.onnx                       # first config of the packaged default plan
  trt-latency export my_plan.yaml --index 2 -o moe.onnx  # the plan's third config
  trt-latency export --tier 1 --top-k 2 --blocks 4 -o moe_k2.onnx
"""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """CONFIG plus the options that pick one (tier_idx, top_k, num_active_blocks) from it."""
    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help="plan YAML (tiers, configs, ...); default: the packaged configs/default.yaml")
    parser.add_argument("--index", type=int, default=None, metavar="I",
                        help="which entry of the plan's configs: list (default 0, the primary config)")
    parser.add_argument("--tier", type=int, default=None, metavar="T", help="tier_idx (instead of --index)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="experts per token (with --tier)")
    parser.add_argument("--blocks", type=int, default=None, metavar="B",
                        help="num_active_blocks (with --tier; default: all the tier's layers)")


def resolve_key(plan: Any, args: argparse.Namespace) -> Any:
    """The ConfigKey the arguments name, validated against the plan's tiers."""
    from trt_latency.engines.config import ConfigKey

    if args.tier is None:
        if args.top_k is not None or args.blocks is not None:
            raise ConfigError(field="--tier", expected="--tier together with --top-k / --blocks")
        index = 0 if args.index is None else args.index
        if not 0 <= index < len(plan.configs):
            raise ConfigError(path=plan.source, field="--index", expected=f"0 .. {len(plan.configs) - 1}",
                              got=index)
        return plan.configs[index]
    if args.index is not None:
        raise ConfigError(field="--index", expected="either --index or --tier, not both")
    tier = plan.tier(args.tier)
    top_k = 1 if args.top_k is None else args.top_k
    blocks = tier.layers if args.blocks is None else args.blocks
    if not 1 <= top_k <= tier.experts:
        raise ConfigError(path=plan.source, field="--top-k", expected=f"1 .. {tier.experts} (tier {tier.tier_idx})",
                          got=top_k)
    if not 1 <= blocks <= tier.layers:
        raise ConfigError(path=plan.source, field="--blocks", expected=f"1 .. {tier.layers} (tier {tier.tier_idx})",
                          got=blocks)
    return ConfigKey(tier.tier_idx, top_k, blocks)


def model_matches(path: Path, tier: Any, key: Any, seed: int) -> bool:
    """True if ``path`` is a model exported with exactly these dims, config and seed (reuse it)."""
    from trt_latency.engines.export import model_metadata, tier_from_metadata

    if not path.is_file():
        return False
    try:
        meta = model_metadata(path)
        have_tier, have_key = tier_from_metadata(meta)
    except Exception:  # noqa: BLE001 - unreadable or foreign model: export a fresh one
        return False
    return bool(have_tier == tier and tuple(have_key) == tuple(key) and meta.get("seed") == seed)


def ensure_model(path: Path, tier: Any, key: Any, seed: int = 0) -> Path:
    """Export the model for (tier, key) to ``path`` unless an identical one is already there."""
    from trt_latency.engines.export import export_decoder

    if model_matches(path, tier, key, seed):
        return path
    return export_decoder(tier, key.top_k, key.num_active_blocks, path, seed=seed)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "export", help="write the plan's reference decoder as ONNX (explicit KV-cache bindings)",
        description="Export a reference decoder (RoPE, GQA attention with past/present KV, dense or top-k MoE MLP) "
                    "for one (tier_idx, top_k, num_active_blocks) of a plan, with onnx.helper and standard ops only.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("-o", "--out", default="model.onnx", metavar="F", help="output model (default model.onnx)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trt_latency.engines.config import load_plan
    from trt_latency.engines.export import export_decoder

    plan = load_plan(args.config)
    key = resolve_key(plan, args)
    tier = plan.tier(key.tier_idx)
    path = export_decoder(tier, key.top_k, key.num_active_blocks, Path(args.out), seed=args.seed)
    from trt_latency.engines.signature import read_signature

    # The same check every verb that opens a model makes: the export must read back as a decoder signature.
    sig = read_signature(path)
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists())
    print(f"wrote {path}: tier {tier.tier_idx} ({tier.name}), top_k {key.top_k}, "
          f"num_active_blocks {key.num_active_blocks}, {tier.params(key.num_active_blocks) / 1e6:.2f} M params, "
          f"{tier.dtype}, {size / 1e6:.1f} MB; signature {sig.token_input}"
          f"{', ' + sig.position_ids if sig.position_ids else ''}, {sig.blocks} KV blocks ({sig.kv_layout}, "
          f"kv_heads {sig.kv_heads}, head_dim {sig.head_dim})")
    return 0
