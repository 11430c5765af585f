"""The replay's mix (engines/replay.py draw_requests, prompt_only; plan key replay.text_scale): prompts are drawn
at every scale, a decoder without a vision chain gets one prompt range, and a plan says which scale it wants."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from trt_latency.engines.config import ReplaySpec, load_plan
from trt_latency.engines.replay import draw_requests, mix_line, prompt_only
from trt_latency.errors import ConfigError

SPEC = ReplaySpec(requests=400, vision_tokens=(0, 64, 256), text_tokens=(8, 768), output_tokens=(2, 256), seed=0)


def test_log_scale_reaches_every_scale_of_prompt_and_keeps_the_outputs() -> None:
    log = draw_requests(SPEC, 400)
    uniform = draw_requests(replace(SPEC, text_scale="uniform"), 400)
    t_log = np.array([r.text_tokens for r in log])
    t_uni = np.array([r.text_tokens for r in uniform])
    assert t_log.min() >= 8 and t_log.max() <= 768 and t_uni.min() >= 8 and t_uni.max() <= 768
    # log-uniform on [8, 768]: a third of the draws under 8 * 96^(1/3) ~ 37 tokens; uniform: about 4%
    assert 0.25 < np.mean(t_log < 37) < 0.42 and np.mean(t_uni < 37) < 0.08
    assert np.median(t_log) == pytest.approx(np.sqrt(8 * 769), rel=0.25)
    # the same stream either way: outputs and vision choices do not move with the text scale
    assert [(r.vision_tokens, r.output_tokens) for r in log] == [(r.vision_tokens, r.output_tokens) for r in uniform]
    assert draw_requests(SPEC, 7) == log[:7]  # request i is the same whichever n a (resumed) run asks for


def test_a_decoder_without_a_vision_chain_draws_one_prompt_range() -> None:
    only = prompt_only(SPEC)
    assert only.vision_tokens == (0,) and only.text_tokens == (8, 1024) and only.max_prompt == SPEC.max_prompt
    assert prompt_only(only) is only
    reqs = draw_requests(only, 300)
    prompts = np.array([r.vision_tokens + r.text_tokens for r in reqs])
    assert all(r.vision_tokens == 0 for r in reqs) and prompts.min() >= 8 and prompts.max() <= 1024
    # the short prompts a text model serves are measured: log(64/8) / log(1025/8) = 43% expected under 64
    # tokens, where the vision choices and a uniform text left about 2.5% (a third at vision 0, 56 in 761 texts)
    old = draw_requests(replace(SPEC, text_scale="uniform"), 300)
    assert np.mean(prompts < 64) > 0.3 > 0.1 > np.mean([r.vision_tokens + r.text_tokens < 64 for r in old])
    assert "prompts of 8-1024 tokens (log-uniform)" in mix_line(only) and "vision" not in mix_line(only)
    assert mix_line(SPEC).startswith("vision tokens [0, 64, 256] + prompts of 8-768")


def test_the_plan_key_picks_the_scale_and_names_a_bad_value(tmp_path: Path) -> None:
    assert load_plan(None).replay.text_scale == "log"
    default = (Path(__file__).resolve().parents[1] / "configs" / "default.yaml").read_text()
    assert "  text_scale: log " in default
    plan = tmp_path / "plan.yaml"
    plan.write_text(default.replace("  text_scale: log ", "  text_scale: uniform "))
    assert load_plan(str(plan)).replay.text_scale == "uniform"
    plan.write_text(default.replace("  text_scale: log ", "  text_scale: linear "))
    with pytest.raises(ConfigError, match=r"replay\.text_scale.*one of log, uniform"):
        load_plan(str(plan))
