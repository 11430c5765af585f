"""Tiny plans the engine, CLI and calibrate tests share."""

from __future__ import annotations

from pathlib import Path

TINY_PLAN = """\
schema_version: 1
tiers:
  - {tier_idx: 0, name: tiny, hidden: 32, layers: 2, heads: 4, kv_heads: 2, head_dim: 8, intermediate: 48,
     vocab: 64, experts: 1, dtype: float32, max_past_len: 256, max_prefill_len: 64}
  - {tier_idx: 1, name: tiny-moe, hidden: 32, layers: 2, heads: 4, kv_heads: 2, head_dim: 8, intermediate: 48,
     vocab: 64, experts: 4, dtype: float32, max_past_len: 256, max_prefill_len: 64}
configs:
  - {tier_idx: 0, top_k: 1, num_active_blocks: 2}
  - {tier_idx: 1, top_k: 2, num_active_blocks: 1}
runtime: {intra_op_threads: 1, inter_op_threads: 1}
sweep:
  decode: {log_points: LOG, linear_points: LIN, reps: REPS, warmup: 1}
  prefill: {lengths: [4, 16], reps: 2}
  seed: 0
quick:
  decode: {log_points: 4, linear_points: 2, reps: 2, warmup: 0}
  prefill: {lengths: [4], reps: 1}
  replay: {requests: 3}
replay:
  requests: 5
  vision_tokens: [0, 8]
  text_tokens: [1, 16]
  output_tokens: [1, 6]
  seed: 0
"""


def write_plan(directory: Path, log: int = 5, lin: int = 4, reps: int = 3) -> Path:
    path = directory / "plan.yaml"
    path.write_text(TINY_PLAN.replace("LOG", str(log)).replace("LIN", str(lin)).replace("REPS", str(reps)))
    return path




CALIBRATE_PLAN = """\
schema_version: 1
tiers:
  - {tier_idx: 0, name: tiny, hidden: 64, layers: 2, heads: 2, kv_heads: 1, head_dim: 32, intermediate: 128,
     vocab: 128, experts: 1, dtype: float32, max_past_len: 256, max_prefill_len: 64}
configs:
  - {tier_idx: 0, top_k: 1, num_active_blocks: 2}
  - {tier_idx: 0, top_k: 1, num_active_blocks: 1}
runtime: {intra_op_threads: 1, inter_op_threads: 1}
sweep:
  decode: {log_points: 4, linear_points: 3, reps: 2, warmup: 1}
  prefill: {lengths: [4, 16, 48], reps: 2}
  seed: 0
quick:
  decode: {log_points: 3, linear_points: 2, reps: 2, warmup: 1}
  prefill: {lengths: [4, 32], reps: 2}
  replay: {requests: 4}
replay:
  requests: 6
  vision_tokens: [0, 8]
  text_tokens: [4, 24]
  output_tokens: [2, 12]
  seed: 0
"""

