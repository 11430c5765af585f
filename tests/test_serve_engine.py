"""The serve engine loop on a real ONNX Runtime session: in-flight batched greedy tokens equal the runner's own
greedy generation per request; EOS, min_tokens, ignore_eos and max_tokens; a cancelled request frees its slot."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from trt_latency.engines.config import TierSpec  # noqa: E402
from trt_latency.engines.export import export_decoder  # noqa: E402
from trt_latency.engines.ort.runner import OrtRunner  # noqa: E402
from trt_latency.engines.ort.slots import SlotDecoder  # noqa: E402
from trt_latency.serving.engine_loop import EngineLoop, GenRequest, Listener  # noqa: E402

TINY = TierSpec(tier_idx=0, name="tiny", hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=48,
                vocab=512, experts=1, dtype="float32", max_past_len=128, max_prefill_len=32)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> OrtRunner:
    path = export_decoder(TINY, 1, 2, tmp_path_factory.mktemp("serve_engine") / "model.onnx")
    return OrtRunner(path, "cpu", intra_op_threads=1, huge_pages=False)


class Collect:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.done = threading.Event()

    def __call__(self, ev: tuple[str, object]) -> None:
        self.events.append(ev)
        if ev[0] != "token":
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [int(v) for k, v in self.events if k == "token"]  # type: ignore[call-overload]


class Steps(Listener):
    def __init__(self) -> None:
        self.batches: list[int] = []

    def stepped(self, reqs: list[GenRequest]) -> None:
        self.batches.append(len(reqs))


def _run(loop: EngineLoop, specs: list[dict[str, object]]) -> list[tuple[GenRequest, Collect]]:
    out = []
    for i, spec in enumerate(specs):
        c = Collect()
        r = GenRequest(i, sink=c, **spec)  # type: ignore[arg-type]
        loop.submit(r)
        out.append((r, c))
    for _, c in out:
        assert c.done.wait(30), "a request did not finish within 30 s"
    return out


def test_batched_tokens_equal_the_runners_greedy_generation(runner: OrtRunner) -> None:
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(1, TINY.vocab, n)] for n in (5, 17, 3, 30, 9, 1)]
    lengths = [20, 7, 33, 12, 1, 25]
    refs = [runner.generate(np.asarray([p]), n).tokens for p, n in zip(prompts, lengths, strict=True)]
    decoder = SlotDecoder(runner, 4)
    assert decoder.can_batch, decoder.why
    steps = Steps()
    loop = EngineLoop(decoder, listener=steps).start()
    try:
        done = _run(loop, [{"prompt": p, "max_tokens": n} for p, n in zip(prompts, lengths, strict=True)])
    finally:
        loop.stop()
    for (r, c), ref in zip(done, refs, strict=True):
        assert c.tokens == ref == r.tokens
        assert c.events[-1] == ("done", "length") and r.ttft_ms is not None and r.total_ms >= r.ttft_ms  # type: ignore[operator]
    assert max(steps.batches) > 1, "six requests on four slots must have shared decode steps"
    assert max(steps.batches) <= 4 and decoder.free() == 4
    assert not loop.alive


def test_warm_up_leaves_every_slot_free_and_the_tokens_unchanged(runner: OrtRunner) -> None:
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(1, TINY.vocab, n)] for n in (6, 11, 2)]
    lengths = [9, 4, 14]
    refs = [runner.generate(np.asarray([p]), n).tokens for p, n in zip(prompts, lengths, strict=True)]
    decoder = SlotDecoder(runner, 3)
    loop = EngineLoop(decoder)
    assert loop.warm_up(steps=5, rounds=2) > 0
    assert decoder.free() == 3 and decoder.relayouts >= 2  # each round's batch laid out once, then stepped
    loop.start()
    try:
        done = _run(loop, [{"prompt": p, "max_tokens": n} for p, n in zip(prompts, lengths, strict=True)])
    finally:
        loop.stop()
    assert [c.tokens for _, c in done] == refs and loop.steps > 0


def test_reusing_the_last_present_equals_relaying_out_every_step(runner: OrtRunner) -> None:
    """The step feeds the previous present back as the past while the batch is unchanged: the same tokens
    as re-laying every row's KV out each step (and as the runner's greedy generation), with re-layouts only
    when the membership changes; a reused slot (new generation) is never fed a stale present."""
    rng = np.random.default_rng(8)
    prompts = [[int(t) for t in rng.integers(1, TINY.vocab, n)] for n in (4, 11, 2, 25, 7, 3, 19)]
    lengths = [30, 9, 40, 14, 3, 22, 17]
    refs = [runner.generate(np.asarray([p]), n).tokens for p, n in zip(prompts, lengths, strict=True)]
    out = {}
    for reuse in (True, False):
        decoder = SlotDecoder(runner, 3)
        decoder.reuse_batch = reuse
        loop = EngineLoop(decoder).start()
        try:
            done = _run(loop, [{"prompt": p, "max_tokens": n} for p, n in zip(prompts, lengths, strict=True)])
        finally:
            loop.stop()
        out[reuse] = ([c.tokens for _, c in done], decoder.relayouts, loop.steps)
    assert out[True][0] == out[False][0] == refs
    relayouts, steps = out[True][1], out[True][2]
    # each request joins once and leaves once: at most that many membership changes, far fewer than steps
    assert out[False][1] == out[False][2] and relayouts <= 2 * len(prompts) < steps, (relayouts, steps)


def test_eos_min_tokens_and_ignore_eos(runner: OrtRunner) -> None:
    prompt = [7, 11, 13, 17]
    ref = runner.generate(np.asarray([prompt]), 12).tokens
    eos = ref[2]
    first = ref.index(eos)  # EOS's first occurrence (it may also be an earlier token)
    loop = EngineLoop(SlotDecoder(runner, 2), eos_id=eos).start()
    try:
        (stop, c1), (late, c2), (ignore, c3) = _run(loop, [
            {"prompt": prompt, "max_tokens": 12},
            {"prompt": prompt, "max_tokens": 12, "min_tokens": first + 2},
            {"prompt": prompt, "max_tokens": 12, "ignore_eos": True}])
    finally:
        loop.stop()
    assert c1.tokens == ref[: first + 1] and c1.events[-1] == ("done", "stop")
    later = [i for i, t in enumerate(ref) if t == eos and i + 1 >= first + 2]
    assert c2.tokens == ref[: later[0] + 1] if later else c2.tokens == ref
    assert c3.tokens == ref and c3.events[-1] == ("done", "length")


def test_a_cancelled_request_frees_its_slot(runner: OrtRunner) -> None:
    decoder = SlotDecoder(runner, 1)
    loop = EngineLoop(decoder).start()
    try:
        seen = threading.Event()
        c = Collect()

        def sink(ev: tuple[str, object]) -> None:
            c(ev)
            if len(c.events) >= 3:
                seen.set()

        r = GenRequest("long", [1, 2, 3], 120, sink, ignore_eos=True)
        loop.submit(r)
        assert seen.wait(30)
        r.cancelled = True
        assert c.done.wait(30) and c.events[-1] == ("done", "cancelled") and len(c.tokens) < 120
        # the one slot is free again: a second request runs to its end
        (_, c2), = _run(loop, [{"prompt": [4, 5], "max_tokens": 3}])
        assert len(c2.tokens) == 3 and decoder.free() == 1
    finally:
        loop.stop(drain=False)
