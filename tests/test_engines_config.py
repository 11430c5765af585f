"""Plan loading and validation; also the tiny plan file the other engine tests share (write_plan)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.plans import TINY_PLAN, write_plan

from trt_latency.engines.config import ConfigKey, load_plan
from trt_latency.errors import ConfigError

# ---- config tests ---------------------------------------------------------------------------------


def test_default_plan_loads_and_quick_keeps_first_config() -> None:
    plan = load_plan()
    assert plan.source.endswith("default.yaml") and len(plan.configs) >= 2
    quick = load_plan(quick=True)
    assert quick.configs == [plan.configs[0]] and quick.quick
    tier = plan.tier(0)
    assert tier.kv_bytes_per_token(2) == 2 * 2 * tier.kv_heads * tier.head_dim * tier.dtype_size


def test_tiny_plan_quick_overrides_merge(tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path), quick=True)
    assert plan.configs == [ConfigKey(0, 1, 2)]
    assert (plan.sweep.decode.reps, plan.sweep.decode.warmup, plan.sweep.prefill.lengths) == (2, 0, (4,))
    assert plan.replay.requests == 3 and plan.replay.text_tokens == (1, 16)  # untouched keys kept


@pytest.mark.parametrize("old,new,field,expected", [
    ("kv_heads: 2, head_dim: 8, intermediate: 48,\n     vocab: 64, experts: 1",
     "kv_heads: 3, head_dim: 8, intermediate: 48,\n     vocab: 64, experts: 1", "tiers[0].kv_heads", "divisor"),
    ("dtype: float32, max_past_len: 256, max_prefill_len: 64}\n  - {tier_idx: 1",
     "dtype: bfloat7, max_past_len: 256, max_prefill_len: 64}\n  - {tier_idx: 1", "tiers[0].dtype", "float32"),
    ("{tier_idx: 1, top_k: 2,", "{tier_idx: 1, top_k: 5,", "configs[1].top_k", "[1, 4]"),
    ("{tier_idx: 0, top_k: 1, num_active_blocks: 2}", "{tier_idx: 9, top_k: 1, num_active_blocks: 2}",
     "configs[0].tier_idx", "tier_idx defined"),
    ("{tier_idx: 0, top_k: 1, num_active_blocks: 2}", "{tier_idx: 0, top_k: 1, num_active_blocks: 3}",
     "configs[0].num_active_blocks", "[1, 2]"),
    ("lengths: [4, 16], reps: 2", "lengths: [4, 100], reps: 2", "sweep.prefill.lengths", "max_prefill_len"),
    ("reps: REPS", "reps: many", "sweep.decode.reps", "an integer"),
    ("runtime: {intra_op_threads: 1", "runtime: {intra_threads: 1", "runtime.intra_threads", "one of the keys"),
    ("output_tokens: [1, 6]", "output_tokens: [6, 1]", "replay.output_tokens", "low <= high"),
    ("output_tokens: [1, 6]", "output_tokens: [1, 600]", "replay.output_tokens", "max_past_len"),
])
def test_invalid_plans_name_file_field_and_expectation(tmp_path: Path, old: str, new: str, field: str,
                                                        expected: str) -> None:
    path = write_plan(tmp_path)
    text = path.read_text()
    assert old.replace("REPS", "3") in text or old in TINY_PLAN
    path.write_text(text.replace(old.replace("REPS", "3"), new))
    with pytest.raises(ConfigError) as err:
        load_plan(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{field}'" in msg and expected in msg, msg


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_plan(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [\n  {tier_idx: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*malformed YAML"):
        load_plan(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="a mapping"):
        load_plan(bad)
