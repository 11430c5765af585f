"""TrtSlotDecoder (engines/trt/slots.py): a TensorRT engine served from per-request KV slots; `serve --engine`.

Everywhere: the decoder's slot bookkeeping over a toy runner on host arrays (each slot's own KV set, its swap
parity and length; refusals as ValueError), serve's make_context choosing it for a tensorrt runner, and
`serve --engine` refusing in one line that names what is missing. With TensorRT and a GPU (skipped elsewhere):
an engine built from the committed optimum export serves two interleaved slots whose tokens equal the runner's
own greedy ``generate`` and the ONNX Runtime SlotDecoder's, and the engine file opened as serve opens it runs
requests through the engine loop.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trt_latency.cli import main
from trt_latency.engines import cuda
from trt_latency.engines.trt import loader
from trt_latency.engines.trt.slots import TrtSlotDecoder
from trt_latency.errors import InputError

DATA = Path(__file__).resolve().parent / "data"
CAL = DATA / "calibration" / "calibration.yaml"
OPTIMUM = DATA / "thirdparty" / "optimum-llama-fp32" / "model.onnx"  # token ids + mask + positions
SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client", "tokenizers")


def _no_trt_gpu() -> str | None:
    """Why the engine tests skip here, else None."""
    if not loader.tensorrt_available():
        return "TensorRT is not installed (tensorrt-stubs alone is not TensorRT)"
    if cuda.device_count() == 0:
        return f"no CUDA device for the bindings: {cuda.cuda_status().explain()}"
    return None


NO_TRT_GPU = _no_trt_gpu()
trt_gpu = pytest.mark.skipif(NO_TRT_GPU is not None, reason=f"needs TensorRT and a GPU: {NO_TRT_GPU}")


# ------------------------------------------------------------------------------------------ toy runner


def _next(seq: np.ndarray, vocab: int) -> int:
    h = 0
    for v in seq.tolist():  # every position counts, in order
        h = (h * 31 + int(v) + 1) % 1_000_003
    return h % vocab


class ToyRunner:
    """The TrtRunner surface TrtSlotDecoder drives, on host arrays. A step writes its past followed by the new
    tokens into the other buffer of each pair (the engine's present) and its greedy token hashes every position
    of that present: a slot stepped on the wrong buffer, length or swap gives other tokens than its sequence."""

    backend = "tensorrt"
    device = "toy"
    source = "<toy>"
    vocab = 97
    max_prefill_len = 8
    max_past_len = 24
    min_past_len = 0

    def __init__(self, blocks: int = 2) -> None:
        names = [f"past_key_values.{b}.{k}" for b in range(blocks) for k in ("key", "value")]
        cap = self.max_past_len + self.max_prefill_len
        self.own_kv = {n: (np.full(cap, -1), np.full(cap, -1)) for n in names}  # the runner's own set (slot 0's)
        self.present = {n: n.replace("past_key_values", "present") for n in names}
        self.warmed = True
        self.warm_ups = 0
        self.steps: list[tuple[int, int, bool]] = []  # (past_len, new_tokens, swap) per engine call

    def warm_up(self) -> None:
        self.warm_ups += 1
        self.warmed = True

    @property
    def pasts_without_present(self) -> list[str]:
        return sorted(set(self.own_kv) - set(self.present))

    def alloc_kv(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        cap = self.max_past_len + self.max_prefill_len
        return {n: (np.full(cap, -1), np.full(cap, -1)) for n in self.own_kv}

    def check_position(self, past_len: int, new_tokens: int) -> None:
        if not self.min_past_len <= past_len <= self.max_past_len:
            raise InputError(field="past_len", expected=f"{self.min_past_len}..{self.max_past_len}", got=past_len)
        if not 1 <= new_tokens <= self.max_prefill_len:
            raise InputError(field="new_tokens", expected=f"1..{self.max_prefill_len}", got=new_tokens)

    def prompt_values(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64)

    def greedy_step(self, x: np.ndarray, past_len: int, swap: bool, kv: Any) -> int:
        n = int(x.shape[1])
        present = np.empty(0)
        for a, b in kv.values():
            past, present = (b, a) if swap else (a, b)
            present[:past_len] = past[:past_len]
            present[past_len:past_len + n] = x[0]
        self.steps.append((past_len, n, swap))
        assert (present[:past_len + n] >= 0).all(), "a step read KV no step wrote"
        return _next(present[:past_len + n], self.vocab)


def _toy_generate(prompt: list[int], n: int, vocab: int = ToyRunner.vocab) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        out.append(_next(np.asarray(seq), vocab))
        seq.append(out[-1])
    return out


def _interleave(decoder: Any, prompts: list[list[int]], lengths: list[int]) -> tuple[list[list[int]], list[int]]:
    """Two requests in two slots as the engine loop interleaves them: A prefilled and stepped, then B prefilled,
    then steps of one slot or of both in one decode call. Each request's tokens, and which request each token
    (each engine row) was for, in order."""
    a, b = decoder.acquire(), decoder.acquire()
    assert a is not None and b is not None and a != b
    slots = [a, b]
    out: list[list[int]] = [[decoder.prefill(a, prompts[0])], []]
    order = [0]
    out[0] += decoder.decode([a])
    order.append(0)
    out[1].append(decoder.prefill(b, prompts[1]))
    order.append(1)
    step = 0
    while live := [i for i in (0, 1) if len(out[i]) < lengths[i]]:
        pick = live if step % 3 == 2 else [live[step % len(live)]]
        for i, token in zip(pick, decoder.decode([slots[i] for i in pick]), strict=True):
            out[i].append(token)
            order.append(i)
        step += 1
    for s in slots:
        decoder.release(s)
    return out, order


# ------------------------------------------------------------------------------------------ toy tests


def test_two_interleaved_slots_each_follow_their_own_sequence() -> None:
    runner = ToyRunner()
    decoder = TrtSlotDecoder(runner, 2)
    assert not decoder.can_batch and decoder.why.startswith("batch 1: the TensorRT runner")
    assert (decoder.vocab, decoder.max_prompt, decoder.max_len) == (97, 8, 25)
    prompts, lengths = [[3, 1, 4, 1, 5], [9, 2, 6]], [12, 9]
    tokens, _ = _interleave(decoder, prompts, lengths)
    assert tokens == [_toy_generate(p, n) for p, n in zip(prompts, lengths, strict=True)]
    assert decoder.free() == 2 and runner.warm_ups == 0  # an already warm runner is not warmed again
    assert [s for s in runner.steps if s[1] > 1] == [(0, 5, False), (0, 3, False)]  # prefills: empty past


def test_a_released_slot_serves_a_new_request_from_scratch() -> None:
    decoder = TrtSlotDecoder(ToyRunner(), 2)
    a = decoder.acquire()
    assert a is not None and decoder.free() == 1
    first = [decoder.prefill(a, [7, 7, 7])] + [decoder.decode([a])[0] for _ in range(4)]
    decoder.release(a)
    again = decoder.acquire()
    assert again == a
    second = [decoder.prefill(a, [1, 2])] + [decoder.decode([a])[0] for _ in range(6)]
    assert first == _toy_generate([7, 7, 7], 5) and second == _toy_generate([1, 2], 7)
    assert decoder.acquire() is not None and decoder.acquire() is None and decoder.free() == 0


def test_refusals_are_value_errors_and_leave_the_slots_as_they_were() -> None:
    decoder = TrtSlotDecoder(ToyRunner(), 2)
    a, b = decoder.acquire(), decoder.acquire()
    assert a is not None and b is not None
    for prompt in ([], list(range(9))):
        with pytest.raises(ValueError, match=r"prompt length must be in \[1, 8\]"):
            decoder.prefill(a, prompt)
    with pytest.raises(ValueError, match="holds no prefilled request"):
        decoder.decode([a])
    decoder.prefill(a, [1, 2, 3])
    decoder.prefill(b, list(range(8)))
    while decoder.slots[b].length < decoder.max_len:
        decoder.decode([b])
    state = [(s.length, s.last_token, s.swap) for s in decoder.slots]
    with pytest.raises(ValueError, match="a slot is full"):
        decoder.decode([a, b])
    assert [(s.length, s.last_token, s.swap) for s in decoder.slots] == state  # a was not stepped either


def test_the_runners_profile_refusal_becomes_a_value_error() -> None:
    class Narrow(ToyRunner):  # a prefill profile shorter than the token input's max (two engines' worth)
        def check_position(self, past_len: int, new_tokens: int) -> None:
            if new_tokens > 4:
                raise InputError(field="new_tokens", expected="a (past_len, new_tokens) inside one of the "
                                 "engine's profiles", got=(past_len, new_tokens))

    decoder = TrtSlotDecoder(Narrow(), 1)
    with pytest.raises(ValueError, match="field 'new_tokens'.*engine's profiles"):
        decoder.prefill(0, [1, 2, 3, 4, 5])
    assert decoder.prefill(0, [1, 2, 3, 4]) == _toy_generate([1, 2, 3, 4], 1)[0]


def test_construction_refuses_what_it_cannot_serve_and_warms_a_cold_runner() -> None:
    with pytest.raises(InputError, match="expected an integer >= 1"):
        TrtSlotDecoder(ToyRunner(), 0)
    empty_past = ToyRunner()
    empty_past.min_past_len = 1  # the fallback profile for a TensorRT without empty tensors
    with pytest.raises(InputError, match="serving prefills with an empty past"):
        TrtSlotDecoder(empty_past, 1)
    no_present = ToyRunner()
    del no_present.present["past_key_values.1.value"]
    with pytest.raises(InputError, match="field 'past_key_values.1.value'.*present output"):
        TrtSlotDecoder(no_present, 1)
    cold = ToyRunner()
    cold.warmed = False
    TrtSlotDecoder(cold, 1)
    assert cold.warm_ups == 1


class _Collect:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.end: tuple[str, Any] | None = None
        self.done = threading.Event()

    def __call__(self, ev: tuple[str, Any]) -> None:
        if ev[0] == "token":
            self.tokens.append(int(ev[1]))
        else:
            self.end = ev
            self.done.set()


def _serve(runner: Any, requests: list[tuple[list[int], int]], max_batch: int = 4) -> tuple[Any, list[_Collect]]:
    """serve's make_context over ``runner`` (the committed calibration), ``requests`` through its engine loop."""
    for module in SERVE_EXTRA:
        pytest.importorskip(module)
    from trt_latency.cli.serve import make_context
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.serving import loadgen
    from trt_latency.serving.engine_loop import GenRequest

    cal = load_calibration(CAL)
    ctx = make_context(runner, cal, loadgen.served_key(CAL.parent / "model.onnx", cal), max_batch=max_batch,
                       model_name="trt")
    sinks = []
    try:
        for i, (prompt, n) in enumerate(requests):
            sinks.append(_Collect())
            ctx.engine.submit(GenRequest(i, prompt=prompt, max_tokens=n, sink=sinks[-1]))
        for s in sinks:
            assert s.done.wait(60), "a request did not finish within 60 s"
    finally:
        ctx.engine.stop()
    return ctx, sinks


def test_serve_builds_the_tensorrt_decoder_for_a_tensorrt_runner() -> None:
    ctx, sinks = _serve(ToyRunner(), [([5, 4, 3], 6), ([8], 10)])
    decoder = ctx.engine.decoder
    assert isinstance(decoder, TrtSlotDecoder) and len(decoder.slots) == 1  # batch 1: one slot allocated
    assert "1 KV slots, batch 1: the TensorRT runner" in ctx.info
    assert [s.tokens for s in sinks] == [_toy_generate([5, 4, 3], 6), _toy_generate([8], 10)]
    assert all(s.end == ("done", "length") for s in sinks)


# ------------------------------------------------------------------------------------------ serve --engine


@pytest.fixture()
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.plan"
    path.write_bytes(b"not a TensorRT engine, and never opened here")
    return path


@pytest.mark.skipif(NO_TRT_GPU is None, reason="TensorRT and a GPU are here: serve --engine would open the engine")
def test_serve_engine_without_tensorrt_names_what_is_missing(plan_file: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for module in SERVE_EXTRA:
        pytest.importorskip(module)
    capsys.readouterr()
    code = main(["serve", "-c", str(CAL), "--engine", str(plan_file)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("trt-latency serve: error: --engine: serving a TensorRT engine needs the tensorrt "
                           "package and a CUDA GPU ("), line
    assert NO_TRT_GPU is not None and ("TensorRT" in line or "CUDA" in line), line  # which of the two is missing
    assert line.endswith("; serve the ONNX model with --onnx"), line
    # The installed command: the same one line, exit status non-zero.
    proc = subprocess.run([sys.executable, "-m", "trt_latency", "serve", "-c", str(CAL), "--engine", str(plan_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == line


def test_serve_engine_and_onnx_are_one_or_the_other(plan_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for module in SERVE_EXTRA:
        pytest.importorskip(module)
    capsys.readouterr()
    assert main(["serve", "-c", str(CAL), "--engine", str(plan_file), "--onnx", str(OPTIMUM)]) == 2
    assert capsys.readouterr().err.strip() == "trt-latency serve: error: --engine and --onnx: give one model to serve"


# ------------------------------------------------------------------------------------------ TensorRT + GPU


@pytest.fixture(scope="module")
def trt_runner(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from trt_latency.engines.trt.runner import TrtRunner

    with TrtRunner.from_onnx(OPTIMUM, max_past_len=64, max_new_tokens=16, cache_dir=tmp_path_factory.mktemp("trt"),
                             kv_mode="auto") as r:
        yield r


PROMPTS = [[int(t) for t in np.random.default_rng(7).integers(1, 512, n)] for n in (11, 4)]
LENGTHS = [20, 30]


def _greedy_refs(runner: Any) -> list[list[int]]:
    return [runner.generate(np.asarray([p]), n).tokens for p, n in zip(PROMPTS, LENGTHS, strict=True)]


@pytest.mark.tensorrt
@pytest.mark.gpu
@trt_gpu
def test_interleaved_slots_give_generates_and_onnx_runtimes_greedy_tokens(trt_runner: Any) -> None:
    from trt_latency.engines.ort.runner import OrtRunner
    from trt_latency.engines.ort.slots import SlotDecoder

    refs = _greedy_refs(trt_runner)
    decoder = TrtSlotDecoder(trt_runner, 2)
    tokens, _ = _interleave(decoder, PROMPTS, LENGTHS)
    assert tokens == refs  # the same engine: the very same tokens
    assert decoder.free() == 2 and all(s.length == len(p) + n - 1 for s, p, n in
                                       zip(decoder.slots, PROMPTS, LENGTHS, strict=True))

    ort = OrtRunner(OPTIMUM, "cpu", intra_op_threads=1, max_past_len=64, max_new_tokens=16, huge_pages=False)
    ort_decoder = SlotDecoder(ort, 2)
    rows: list[np.ndarray] = []  # the last position's logits of every row of every ONNX Runtime call
    run = ort_decoder._run

    def recorded(*args: Any) -> list[np.ndarray]:
        out = run(*args)
        rows.extend(out[0][:, -1].copy())
        return out

    ort_decoder._run = recorded  # type: ignore[method-assign]
    ort_tokens, order = _interleave(ort_decoder, PROMPTS, LENGTHS)
    assert len(rows) == len(order)
    for i in (0, 1):
        logits = [row for row, r in zip(rows, order, strict=True) if r == i]
        # TensorRT may run fp32 matmuls in TF32: where the two first part, TensorRT's token must be an argmax of
        # ONNX Runtime's logits within 1e-2 of their scale (the sequences differ after that).
        for t, (got, want) in enumerate(zip(tokens[i], ort_tokens[i], strict=True)):
            if got != want:
                row = logits[t]
                assert row[got] >= row.max() - 1e-2 * max(float(np.abs(row).max()), 1e-6), (i, t, got, want)
                break


@pytest.mark.tensorrt
@pytest.mark.gpu
@trt_gpu
def test_engine_refusals_and_slot_reuse(trt_runner: Any) -> None:
    decoder = TrtSlotDecoder(trt_runner, 1)
    assert (decoder.max_prompt, decoder.max_len) == (16, 65)
    a = decoder.acquire()
    assert a == 0
    with pytest.raises(ValueError, match=r"prompt length must be in \[1, 16\]"):
        decoder.prefill(a, list(range(1, 18)))
    decoder.prefill(a, list(range(1, 17)))
    while decoder.slots[a].length < decoder.max_len:  # past_len up to the profile's max, 64
        decoder.decode([a])
    with pytest.raises(ValueError, match="a slot is full"):
        decoder.decode([a])
    decoder.release(a)
    again = decoder.acquire()
    assert again == a
    first = [decoder.prefill(a, PROMPTS[0])] + [decoder.decode([a])[0] for _ in range(LENGTHS[0] - 1)]
    assert first == _greedy_refs(trt_runner)[0]  # nothing of the full request is left in the slot


@pytest.mark.tensorrt
@pytest.mark.gpu
@trt_gpu
def test_the_engine_file_served_as_serve_opens_it(trt_runner: Any, tmp_path: Path) -> None:
    from trt_latency.serving import loadgen

    plan = tmp_path / "model.plan"  # the engine from_onnx built, as a user's prebuilt --engine
    shutil.copy(trt_runner.source, plan)
    with loadgen.open_model(plan, "tensorrt", 0, kv_mode="auto", io=None, dims=None, max_past_len=None,
                            huge_pages=False) as runner:
        assert runner.backend == "tensorrt" and runner.token_input == "input_ids"
        ctx, sinks = _serve(runner, list(zip(PROMPTS, LENGTHS, strict=True)))
    assert "1 KV slots, batch 1: the TensorRT runner" in ctx.info
    assert [s.tokens for s in sinks] == _greedy_refs(trt_runner)
