"""`trt-latency inspect`: the decoder signature trt-latency reads from a model, and what one step binds."""

from __future__ import annotations

import argparse
import json
from typing import Any

from trt_latency.cli._args import positive_int
from trt_latency.cli._model import KV_MODES

EXAMPLE = """\
examples:
  trt-latency inspect genai/model.onnx                  # roles, dims and where each came from
  trt-latency inspect genai/model.onnx --past-len 1024  # what a decode step at past 1024 binds
  trt-latency inspect model.onnx --json                 # the same as JSON (token_input, kv_mode, ...)
  trt-latency inspect odd.onnx --io ids=input_ids,kv_k0=past_key.0 --dims head_dim=64

Fails with one line naming the model, the inputs found, the role missing and the flag that fixes it.
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "inspect", help="show the decoder signature of a model (roles, KV layout, dims) and what a step binds",
        description="Read an ONNX decoder's signature the way calibrate / sweep / replay will bind it: token "
                    "input, attention_mask, position_ids, KV tensors and layout, KV mode, dims and their sources "
                    "(shapes, genai_config.json / config.json, the graph, flags). Weights are not loaded.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="model.onnx (external weight files are not read)")
    parser.add_argument("--json", action="store_true", help="print the signature as JSON")
    parser.add_argument("--past-len", type=int, default=None, metavar="L",
                        help="show the bindings of a decode step at past length L (default 1)")
    parser.add_argument("--new-tokens", type=positive_int, default=1, metavar="S",
                        help="tokens of that step (default 1: a decode step; S > 1: a prefill chunk)")
    parser.add_argument("--kv-mode", choices=KV_MODES, default="auto", help="KV binding to show (default auto)")
    parser.add_argument("--io", metavar="NAME=ROLE,...", help="name odd inputs/outputs (see calibrate --help)")
    parser.add_argument("--dims", metavar="NAME=N,...", help="dims neither shapes nor configs give")
    parser.add_argument("--vision", action="store_true",
                        help="MODEL is a VLM's vision encoder: describe its family, inputs and a feeds example")
    parser.add_argument("--vision-family", choices=("vit", "qwen2.5-vl"), help="with --vision: the encoder's family")
    parser.add_argument("--vision-config", metavar="config.json", help="with --vision: the encoder's config.json")
    parser.add_argument("--vision-feeds", metavar="module:function", help="with --vision: your feeds builder")
    parser.set_defaults(func=run)


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def render(sig: Any, kv_mode: str, past_len: int, new_tokens: int) -> str:
    """The human-readable report (what `inspect` prints without --json)."""
    d = sig.describe(kv_mode)
    src = d["sources"]
    kv = sig.kv[0]
    if sig.kv_layout == "fused":
        kv_names = f"{kv.past_key} -> {kv.present_key} (fused [2, B, kv_heads, L, head_dim])"
    else:
        kv_names = f"{kv.past_key}|{kv.past_value} -> {kv.present_key}|{kv.present_value}"
    mode_why = ("genai_config.json past_present_share_buffer" if sig.share_buffer else "no share-buffer config")
    lines = [
        f"Model: {sig.model}",
        f"  token input     {d['token_input']}: '{d['token_name']}' {d['token_dtype']}",
        f"  attention_mask  {d['attention_mask'] or '-'}",
        f"  position_ids    {d['position_ids'] or '- (positions inside the model)'}",
        f"  logits          '{d['logits']}' vocab {d['vocab']} ({src.get('vocab', '?')})",
        f"  KV              {d['blocks']} blocks, {d['kv_dtype']}, block 0: {kv_names}",
        f"  kv_heads        {d['kv_heads']} ({src.get('kv_heads', '?')})",
        f"  head_dim        {d['head_dim']} ({src.get('head_dim', '?')})",
        f"  hidden          {d['hidden'] if d['hidden'] else '-'}"
        + (f" ({src['hidden']})" if d["hidden"] and "hidden" in src else ""),
        f"  max_past_len    {d['max_past_len'] if d['max_past_len'] is not None else '-'} ({src['max_past_len']})",
        f"  kv_mode         {d['kv_mode']}" + (f" (auto: {mode_why})" if kv_mode == "auto" else " (--kv-mode)"),
        f"  attention ops   {', '.join(d['attention_ops']) or '- (standard ops)'}",
        "",
        f"A step at past_len {past_len} with {new_tokens} new token(s) ({d['kv_mode']}) binds:",
    ]
    for b in sig.step_bindings(past_len, new_tokens, d["kv_mode"], max_len=None if d["kv_mode"] == "concat"
                               else max(past_len + new_tokens, (sig.max_past_len or past_len) + 1)):
        lines.append(f"  {b['io']:<6} {b['name']:<28} {_shape(b['shape']):<18} {b['dtype']:<8} {b['role']}")
    if d["kv_mode"] == "shared":
        lines.append("  (shared: one buffer of max_len tokens per KV tensor; the mask's length past + S tells the "
                     "attention where to write)")
    if sig.token_input == "input_ids":
        lines.append("Replay feeds token ids; a request's vision tokens are prompt tokens (ids) like its text tokens.")
    return "\n".join(lines)


def run_vision(args: argparse.Namespace) -> int:
    import numpy as np

    from trt_latency.engines.vision import adapter_for, read_vision_signature

    sig = read_vision_signature(args.model, family=args.vision_family, config=args.vision_config,
                                feeds=args.vision_feeds)
    d = sig.describe()
    n = 64  # a multiple of every family's merge unit (qwen2.5-vl: 4)
    feeds = adapter_for(sig).feeds(n, 2, np.random.default_rng(0))
    d["feeds_example"] = {"patches_per_image": n, "images": 2,
                          "inputs": {k: f"{list(v.shape)} {v.dtype}" for k, v in feeds.items()}}
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"vision encoder {d['path']}")
    print(f"  family           {d['family']} (from {d['family_source']})")
    print(f"  tokens per patch {d['tokens_per_patch']:g}")
    for t in d["inputs"]:
        print(f"  input            {t}")
    for t in d["outputs"]:
        print(f"  output           {t}")
    print(f"  feeds for 2 images x {n} patches: " + ", ".join(f"{k} {v}" for k, v in d["feeds_example"]["inputs"].items()))
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "vision", False):
        return run_vision(args)
    from trt_latency.engines.signature import read_signature
    from trt_latency.errors import InputError

    sig = read_signature(args.model, io=args.io, dims=args.dims)
    past = 1 if args.past_len is None else args.past_len
    if past < 0 or (sig.max_past_len is not None and past > sig.max_past_len):
        raise InputError(path=args.model, field="--past-len",
                         expected=f"0 .. {sig.max_past_len if sig.max_past_len is not None else 'any'} "
                                  "(the model's longest past)", got=past)
    mode = sig.resolve_kv_mode(args.kv_mode)
    if args.json:
        out = sig.describe(args.kv_mode)
        max_len = None if mode == "concat" else max(past + args.new_tokens, (sig.max_past_len or past) + 1)
        out["step"] = {"past_len": past, "new_tokens": args.new_tokens,
                       "bindings": sig.step_bindings(past, args.new_tokens, mode, max_len=max_len)}
        print(json.dumps(out, indent=2))
        return 0
    print(render(sig, args.kv_mode, past, args.new_tokens))
    return 0
