"""Batched decode steps on real ONNX Runtime sessions: a ragged batch's per-row logits equal each row run
alone (reference decoder with its attention mask, and third-party decoders), and time_batch_step's contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trt_latency.engines.base import supports_batch
from trt_latency.engines.config import TierSpec
from trt_latency.engines.export import export_decoder
from trt_latency.engines.ort.runner import OrtRunner

DATA = Path(__file__).parent / "data" / "thirdparty"
TINY = TierSpec(tier_idx=0, name="tiny", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                intermediate=128, vocab=256, experts=1, dtype="float32", max_past_len=64, max_prefill_len=32)
RAGGED = [5, 2, 9, 1]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_decoder(TINY, 1, 2, tmp_path_factory.mktemp("batch") / "model.onnx")


def _open(path: Path) -> OrtRunner:
    return OrtRunner(path, "cpu", intra_op_threads=1, max_past_len=64, max_new_tokens=32, max_batch=4)


def _alone_vs_batched(runner: OrtRunner, lens: list[int]) -> list[float]:
    """Per row: its KV from a prefill of its own L tokens, its reference = the last logits of a prefill of
    L + 1 tokens (KV-cache equivalence is tested elsewhere); then one ragged batched step over all rows."""
    rng = np.random.default_rng(1)
    kinds = ("key",) if runner.signature.kv_layout == "fused" else ("key", "value")
    kv_rows, tokens, refs = [], [], []
    for n in lens:
        prompt = runner.random_prompt(n + 1, rng)
        runner.generate(prompt[:, :n], 1)
        kv_rows.append([[runner.present(b, k, n, runner._last_past_set) for k in kinds]
                        for b in range(runner.dims.blocks)])
        runner.generate(prompt, 1)
        refs.append(runner.last_logits(n + 1))
        tokens.append(prompt[0, n])
    out = runner.batch_step_logits(lens, np.stack(tokens), kv_rows)
    return [float(np.abs(out[i] - ref).max() / np.abs(ref).max()) for i, ref in enumerate(refs)]


@pytest.mark.parametrize("model", ["reference", "genai-llama-fp32", "optimum-llama-fp32"])
def test_ragged_batch_rows_equal_each_row_alone(model: str, tiny_onnx: Path) -> None:
    path = tiny_onnx if model == "reference" else DATA / model / "model.onnx"
    with _open(path) as runner:
        errs = _alone_vs_batched(runner, RAGGED)
        assert max(errs) < 1e-3, errs
        # Padding is real: the same rows with the mask ignored (all ones) would differ for the short rows.
        expected = ("shared", "right", "packed") if model.startswith("genai") else ("concat", "left", "padded")
        assert (runner.kv_mode, runner.batch_padding, runner.batch_kv_read) == expected


def test_mask_matters(tiny_onnx: Path) -> None:
    """Without the mask the padded rows would attend to the padding: the check above can fail."""
    with _open(tiny_onnx) as runner:
        lens = [9, 2]
        good = _alone_vs_batched(runner, lens)
        # Mark every position visible (a mask of ones) and rerun: row 1 (short, left-padded) changes.
        orig = runner.prepare_batch

        def ones_mask(kv_lens: list[int]) -> object:
            binding = orig(kv_lens)
            assert runner._batch is not None
            runner._batch["host"]["mask"][:] = 1
            return binding

        runner.prepare_batch = ones_mask  # type: ignore[method-assign]
        bad = _alone_vs_batched(runner, lens)
    assert max(good) < 1e-3 and bad[1] > 1e-2 and bad[0] < 1e-3


def test_time_batch_step_contract(tiny_onnx: Path) -> None:
    with _open(tiny_onnx) as runner:
        assert supports_batch(runner) and runner.max_batch == 4 and runner.prefill_with_batch == "separate"
        for lens in ([3], [7, 7], [1, 30, 12, 0]):
            ms = runner.time_batch_step(lens, 3)
            assert ms.shape == (3,) and ms.dtype == np.float64 and (ms > 0).all()
        with pytest.raises(ValueError, match="max_batch"):
            runner.time_batch_step([1] * 5, 1)
        with pytest.raises(ValueError, match="kv_lens"):
            runner.time_batch_step([65], 1)
        # The single-request path is untouched by batching (its own buffers).
        assert runner.time_step(10, 1, 2).shape == (2,)
