"""`trt-latency serve` over real HTTP: a tiny calibrated model, the committed byte-level BPE tokenizer
(tests/data/serve, tools/fixtures/make_serve_tokenizer.py), uvicorn on 127.0.0.1 with an ephemeral port and
httpx as the client. Streaming and not, tokens equal to the runner's greedy generation, the 429 body, every
bad input a 400 naming its field, a disconnect mid-stream freeing its slot, /metrics adding up, and (as a
subprocess) SIGTERM: 503 for new requests, the running one finishes, exit 0. Every loop is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("tokenizers")

from trt_latency.cli import main  # noqa: E402

TOKENIZER = Path(__file__).parent / "data" / "serve"
PLAN = """\
schema_version: 1
tiers:
  - {tier_idx: 0, name: tiny, hidden: 32, layers: 2, heads: 4, kv_heads: 2, head_dim: 8, intermediate: 48,
     vocab: 512, experts: 1, dtype: float32, max_past_len: 256, max_prefill_len: 64}
configs:
  - {tier_idx: 0, top_k: 1, num_active_blocks: 2}
runtime: {intra_op_threads: 1, inter_op_threads: 1, huge_pages: false}
sweep:
  decode: {log_points: 5, linear_points: 4, reps: 3, warmup: 1}
  prefill: {lengths: [4, 16, 64], reps: 2}
  seed: 0
quick:
  decode: {log_points: 5, linear_points: 4, reps: 3, warmup: 1}
  prefill: {lengths: [4, 16, 64], reps: 2}
  replay: {requests: 20}
replay: {requests: 20, vision_tokens: [0], text_tokens: [4, 40], output_tokens: [2, 24], seed: 0}
"""


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("serve")
    (d / "plan.yaml").write_text(PLAN)
    assert main(["calibrate", str(d / "plan.yaml"), "--quick", "--out", str(d / "cal"), "--backend", "ort-cpu",
                 "--no-progress"]) == 0
    return d / "cal"


class Server:
    """The app on uvicorn in a thread (signals are the subprocess test's), on a pre-bound ephemeral port."""

    def __init__(self, cal_dir: Path, **kw: Any) -> None:
        from trt_latency.cli.serve import load_tokenizer, make_context
        from trt_latency.engines.ort.runner import OrtRunner
        from trt_latency.estimator.calibration import load_calibration
        from trt_latency.serving import loadgen
        from trt_latency.serving.http_app import create_app

        cal = load_calibration(cal_dir / "calibration.yaml")
        self.runner = OrtRunner(cal_dir / "model.onnx", "cpu", intra_op_threads=1, huge_pages=False)
        tok, eos = load_tokenizer(TOKENIZER)
        self.ctx = make_context(self.runner, cal, loadgen.served_key(cal_dir / "model.onnx", cal), tokenizer=tok,
                                eos_id=eos, model_name="tiny", **kw)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.ctx), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        end = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < end, "server did not start in 20 s"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.ctx.engine.stop(drain=False, timeout=10)
        self.runner.close()

    def stats(self) -> dict[str, Any]:
        return self.client.get("/stats").json()  # type: ignore[no-any-return]

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in self.client.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture(scope="module")
def server(calibrated: Path) -> Iterator[Server]:
    s = Server(calibrated, max_batch=8)
    yield s
    s.close()


def _stream(client: Any, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int], str]:
    chunks: list[dict[str, Any]] = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    tokens = [t for c in chunks for ch in c["choices"] for t in ch["token_ids"]]
    return chunks, tokens, "".join(ch["text"] for c in chunks for ch in c["choices"])


def _at_once(one: Any, n: int) -> None:
    """one(0) .. one(n - 1) on n threads at once (each joined within 60 s)."""
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def _greedy(calibrated: Path, prompts: list[Any], lengths: list[int]) -> dict[int, list[int]]:
    """The runner's own greedy tokens for each prompt (what every front end must serve)."""
    from trt_latency.engines.ort.runner import OrtRunner

    with OrtRunner(calibrated / "model.onnx", "cpu", intra_op_threads=1, huge_pages=False) as ref:
        return {i: ref.generate(np.asarray([p]), n).tokens for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))}


def test_streaming_and_not_give_the_runners_greedy_tokens(server: Server, calibrated: Path) -> None:
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(1, 512, n)] for n in (4, 19, 7, 33, 2, 12)]
    lengths = [9, 20, 3, 14, 25, 6]
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": lengths[i], "ignore_eos": True}
        if i % 2:
            chunks, tokens, _ = _stream(server.client, body)
            assert chunks[-1]["usage"]["completion_tokens"] == lengths[i] and chunks[-1]["choices"] == []
            assert chunks[-2]["choices"][0]["finish_reason"] == "length"
            results[i] = tokens
        else:
            r = server.client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            results[i] = r.json()["choices"][0]["token_ids"]
            assert r.json()["usage"] == {"prompt_tokens": len(prompts[i]), "completion_tokens": lengths[i],
                                         "total_tokens": len(prompts[i]) + lengths[i]}

    _at_once(one, len(prompts))
    assert results == _greedy(calibrated, prompts, lengths)


def test_text_prompt_streams_the_same_text_as_non_streaming(server: Server) -> None:
    body = {"prompt": "def main(argv):\n    return 0", "max_tokens": 12, "ignore_eos": True}
    r = server.client.post("/v1/completions", json=body)
    assert r.status_code == 200
    _, tokens, text = _stream(server.client, body)
    assert tokens == r.json()["choices"][0]["token_ids"] and text == r.json()["choices"][0]["text"]
    assert r.json()["usage"]["prompt_tokens"] == len(server.ctx.tokenizer.encode(body["prompt"]).ids)
    models = server.client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_an_slo_that_cannot_be_met_gets_429_with_why(server: Server) -> None:
    r = server.client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 100, "slo_ms": 0.001})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    body = r.json()
    assert body["budget_ms"] == 0.001 and body["predicted_ms"] > 0.001 and body["max_tokens_that_fit"] == 0
    assert "over budget" in body["reason"] and body["slo_source"] == "body slo_ms"
    # the header, when the body has none; and a budget that fits some tokens names how many
    ok = server.client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3},
                            headers={"x-slo-ms": "10000"})
    assert ok.status_code == 200
    pred = server.ctx.admission.est.total_with([], 3, 60)
    fit = server.client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 250,
                                                      "ttft_slo_ms": pred / 2, "tpot_slo_ms": pred / 120})
    assert fit.status_code == 429 and 1 <= fit.json()["max_tokens_that_fit"] < 250


BAD = [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (json.dumps({"model": "gpt-4", "prompt": [1]}).encode(), "model"),
    (json.dumps({"prompt": ""}).encode(), "prompt"),
    (json.dumps({"prompt": []}).encode(), "prompt"),
    (json.dumps({"prompt": 5}).encode(), "prompt"),
    (json.dumps({"prompt": [1, 99999]}).encode(), "prompt"),
    (json.dumps({"prompt": [1] * 65}).encode(), "prompt"),  # over the longest prefill (64)
    (json.dumps({"prompt": "x" * 4000}).encode(), "prompt"),
    (json.dumps({"prompt": [1], "max_tokens": -1}).encode(), "max_tokens"),
    (json.dumps({"prompt": [1], "max_tokens": 10**9}).encode(), "max_tokens"),
    (json.dumps({"prompt": [1], "max_tokens": "12"}).encode(), "max_tokens"),
    (json.dumps({"prompt": [1], "min_tokens": 9, "max_tokens": 4}).encode(), "min_tokens"),
    (json.dumps({"prompt": [1], "stream": "yes"}).encode(), "stream"),
    (json.dumps({"prompt": [1], "slo_ms": -3}).encode(), "slo_ms"),
    (json.dumps({"prompt": [1], "ttft_slo_ms": 5}).encode(), "ttft_slo_ms"),
]


def test_bad_input_is_a_400_naming_the_field_and_the_server_lives(server: Server) -> None:
    before = server.metrics()
    for raw, field in BAD:
        r = server.client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        err = r.json()["error"]
        assert err["param"] == field and field in err["message"], (raw, err)
    r = server.client.post("/v1/completions", json={"prompt": [1]}, headers={"x-slo-ms": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-slo-ms"
    after = server.metrics()
    bad = sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith("trtl_bad_requests_total"))
    assert bad == len(BAD) + 1
    assert server.client.get("/health").json() == {"status": "ok"}
    assert server.client.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}).status_code == 200


def _wait(cond: Any, seconds: float = 20.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_a_client_gone_mid_stream_frees_its_slot(server: Server) -> None:
    before = server.metrics().get('trtl_finished_total{finish_reason="cancelled"}', 0.0)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions",
                           json={"prompt": [3, 4], "max_tokens": 250, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            got = [ln for _, ln in zip(range(6), lines, strict=False)]
            assert any(ln.startswith("data: ") for ln in got)
            assert server.stats()["running"] == 1
    # the connection is closed: the engine drops the request at its next iteration
    assert _wait(lambda: server.stats()["running"] == 0), server.stats()
    m = server.metrics()
    assert m['trtl_finished_total{finish_reason="cancelled"}'] == before + 1
    assert server.ctx.engine.decoder.free() == 8


def test_metrics_add_up(server: Server) -> None:
    assert _wait(lambda: server.ctx.engine.idle())
    for i in range(4):
        server.client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4 + i, "slo_ms": 10000})
    server.client.post("/v1/completions", json={"prompt": [5], "max_tokens": 50, "slo_ms": 0.001})
    assert _wait(lambda: server.ctx.engine.idle())
    m = server.metrics()
    admits = sum(v for k, v in m.items() if k.startswith('trtl_decisions_total{outcome="admit"'))
    rejects = sum(v for k, v in m.items() if k.startswith('trtl_decisions_total{outcome="reject"'))
    finished = sum(v for k, v in m.items() if k.startswith("trtl_finished_total"))
    completed = sum(v for k, v in m.items() if k.startswith("trtl_finished_total") and "cancelled" not in k)
    counters = server.stats()["controller"]
    assert admits == counters["admits"] == finished and rejects == counters["rejects"] >= 1
    assert m["trtl_slo_met_total"] + m["trtl_slo_violations_total"] == completed
    # the controller heard each completed request's outcome (the adaptive level's signal), as /metrics counted it
    assert (counters["on_time"], counters["late"]) == (m["trtl_slo_met_total"], m["trtl_slo_violations_total"])
    assert m["trtl_quantile_level"] == counters["level"]
    assert m["trtl_observed_total_ms_count"] == completed == m["trtl_observed_ttft_ms_count"]
    assert m["trtl_predicted_total_ms_count"] == admits and m["trtl_decision_ns_count"] == admits + rejects
    assert m["trtl_running_batch"] == 0 and m["trtl_queue_depth"] == 0
    st = server.stats()["decide_ns"]
    assert st["n"] == admits + rejects and 0 < st["p50"] <= st["p99"]


def test_sigterm_drains_the_running_request_and_exits_0(calibrated: Path) -> None:
    cmd = [sys.executable, "-m", "trt_latency.cli", "serve", "-c", str(calibrated / "calibration.yaml"), "--port",
           "0", "--tokenizer", str(TOKENIZER), "--max-batch", "2", "--admission", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        url = None
        for _ in range(20):
            line = proc.stdout.readline()
            if "listening on" in line:
                url = line.split("listening on ")[1].strip()
                break
        assert url, "no 'listening on' line"
        with httpx.Client(base_url=url, timeout=30) as client:
            assert _wait(lambda: client.get("/health").status_code == 200)
            with client.stream("POST", "/v1/completions", json={"prompt": [1, 2], "max_tokens": 250,
                                                                "ignore_eos": True, "stream": True}) as r:
                lines = r.iter_lines()
                first = next(lines)
                assert first.startswith("data: ")
                proc.send_signal(signal.SIGTERM)
                assert _wait(lambda: client.get("/health").status_code == 503, 10)
                late = client.post("/v1/completions", json={"prompt": [1], "max_tokens": 2})
                assert late.status_code == 503 and "draining" in late.json()["error"]["message"]
                rest = [ln for ln in lines if ln.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            usage = json.loads(rest[-2][6:])["usage"]
            assert usage["completion_tokens"] == 250
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_baselines_run_through_the_same_server(calibrated: Path) -> None:
    seed = Server(calibrated, admission="seed-1.3", max_batch=2)
    try:
        r = seed.client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 50, "slo_ms": 0.01})
        assert r.status_code == 429 and "seed's constant rate" in r.json()["reason"]
        assert r.json()["max_tokens_that_fit"] == 0
        ok = seed.client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 5, "slo_ms": 60000})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 5
        assert seed.stats()["controller"] is None and seed.stats()["decide_ns"]["n"] == 2
    finally:
        seed.close()
    none = Server(calibrated, admission="none", max_batch=1)
    try:  # admission off: an impossible SLO is admitted all the same, and counted as a violation
        r = none.client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4, "slo_ms": 0.01})
        assert r.status_code == 200
        assert _wait(lambda: none.metrics().get("trtl_slo_violations_total") == 1.0)
    finally:
        none.close()


def test_readme_serving_block_runs(calibrated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## In your own serving process"):]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    monkeypatch.chdir(calibrated.parent)
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README is ours
    assert namespace["ctl"].counters()["decisions"] == 1 and namespace["ctl"].running() == 0


def test_without_the_extra_the_verb_says_which_to_install(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import trt_latency.cli.serve as serve

    monkeypatch.setattr(serve, "EXTRA", (*serve.EXTRA, "no_such_module_for_serve"))
    assert main(["serve", "-c", "missing.yaml"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'trt-latency[serve]'" in err[0] and "no_such_module_for_serve" in err[0]


def test_a_full_batch_waits_for_a_slot_while_the_slo_allows(calibrated: Path) -> None:
    one = Server(calibrated, max_batch=1)
    decode = one.ctx.engine.decoder.decode

    def slow_decode(slots: list[int]) -> list[int]:  # a slower engine (10 ms a step): the first request holds
        time.sleep(0.01)                               # its slot while the others arrive
        return decode(slots)  # type: ignore[no-any-return]

    one.ctx.engine.decoder.decode = slow_decode
    try:
        with httpx.Client(base_url=one.url, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json={"prompt": [1, 2], "max_tokens": 100,
                                                                "ignore_eos": True, "stream": True,
                                                                "slo_ms": 60000}) as r:
                lines = r.iter_lines()
                next(lines)
                assert one.stats()["running"] == 1
                # every slot is held: a loose SLO waits for it and runs; one that cannot fit even alone is a 429
                late = one.client.post("/v1/completions", json={"prompt": [3], "max_tokens": 3, "slo_ms": 60000})
                tight = one.client.post("/v1/completions", json={"prompt": [3], "max_tokens": 200, "slo_ms": 0.01})
                assert [ln for ln in lines if ln][-1] == "data: [DONE]"
        assert late.status_code == 200 and late.json()["usage"]["completion_tokens"] == 3
        assert tight.status_code == 429
        m = one.metrics()
        assert sum(v for k, v in m.items() if k.startswith('trtl_decisions_total{outcome="admit"')) == 2
        assert sum(v for k, v in m.items() if k.startswith('trtl_decisions_total{outcome="reject"')) == 1
    finally:
        one.close()


def test_the_ttft_check_learns_a_reserve_online(calibrated: Path) -> None:
    """After enough streamed requests the TTFT check is prefill (+ o_p) + the conformal quantile of the
    observed TTFT-from-decision residuals: a TTFT SLO below that gets a 429 naming TTFT, one above it passes."""
    from trt_latency.serving.conformal import min_requests_for

    alpha = 0.2
    s = Server(calibrated, max_batch=4, alpha=alpha)
    try:
        assert s.stats()["ttft_reserve_ms"] is None
        for _ in range(min_requests_for(alpha)):
            _stream(s.client, {"prompt": [5, 6, 7], "max_tokens": 3, "slo_ms": 1e5})
        assert _wait(lambda: s.ctx.engine.idle())
        reserve = s.stats()["ttft_reserve_ms"]
        assert reserve is not None and 0.0 <= reserve < 5e3
        adm = s.ctx.admission
        want = adm.est.ttft_ms(3) + reserve
        assert adm.predicted_ttft(3, 1) == pytest.approx(want)
        body = {"prompt": [5, 6, 7], "max_tokens": 3, "tpot_slo_ms": 1e4}
        tight = s.client.post("/v1/completions", json={**body, "ttft_slo_ms": want * 0.5})
        assert tight.status_code == 429 and "TTFT" in tight.json()["error"]["message"]
        loose = s.client.post("/v1/completions", json={**body, "ttft_slo_ms": want + 1e3})
        assert loose.status_code == 200
    finally:
        s.close()


def test_a_stuck_factor_admits_a_probe_and_metrics_show_it(calibrated: Path) -> None:
    """A controller whose factor (4) rejects a request the model alone fits: into the empty batch it is
    admitted once as a probe (reason and /metrics say so), the next one within the probe interval is a 429."""
    from trt_latency.serving.batch_reference import PROBE_REASON

    s = Server(calibrated, max_batch=4, probe_interval_ms=60_000.0, factor_max=8.0)
    try:
        adm = s.ctx.admission
        assert adm.controller.clamp == (0.5, 8.0)  # serve --factor-max reaches the controller
        assert adm.controller.level_step == 0.05  # and --alpha-step's default
        adm.controller.base_factor = 4.0
        body = {"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True,
                "slo_ms": 2.0 * adm.est.total_with([], 3, 4)}
        first = s.client.post("/v1/completions", json=body)
        assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 4
        second = s.client.post("/v1/completions", json=body)
        assert second.status_code == 429 and "over budget" in second.json()["error"]["message"]
        assert _wait(lambda: s.ctx.engine.idle())
        m = s.metrics()
        probe = [v for k, v in m.items() if k.startswith('trtl_decisions_total{outcome="admit"') and "probe" in k]
        assert probe == [1.0] and PROBE_REASON.startswith("admitted as a probe")
        assert m["trtl_probe_admissions_total"] == 1.0 and m["trtl_live_scores"] == 1.0
        assert m["trtl_expired_scores_total"] == 0.0
        c = s.stats()["controller"]
        assert c["probes"] == 1 and c["admits"] == 1 and c["scores"] == 1
    finally:
        s.close()


# --- the same loop behind Triton's front end (serving/triton_front.py; pytriton itself is not installed in CI:
# benchmarks/pytriton_serve.py runs it behind a real Triton server) ---------------------------------------

@pytest.fixture()
def triton_front(calibrated: Path) -> Iterator[Any]:
    from trt_latency.cli.serve import make_context
    from trt_latency.engines.ort.runner import OrtRunner
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.serving import loadgen
    from trt_latency.serving.triton_front import TritonFront

    cal = load_calibration(calibrated / "calibration.yaml")
    runner = OrtRunner(calibrated / "model.onnx", "cpu", intra_op_threads=1, huge_pages=False)
    ctx = make_context(runner, cal, loadgen.served_key(calibrated / "model.onnx", cal), max_batch=4, model_name="tiny")
    yield TritonFront(ctx, timeout_s=60)
    ctx.engine.stop(drain=False, timeout=10)
    runner.close()


def test_triton_front_serves_the_runners_greedy_tokens_concurrently(triton_front: Any, calibrated: Path) -> None:
    rng = np.random.default_rng(8)
    prompts = [rng.integers(1, 512, n).astype(np.int64) for n in (5, 17, 3, 30, 9, 12)]
    lengths = [7, 12, 4, 9, 15, 6]
    out: dict[int, dict[str, np.ndarray]] = {}

    def one(i: int) -> None:
        out[i] = triton_front(input_ids=prompts[i], max_tokens=np.asarray([lengths[i]], np.int32),
                              slo_ms=np.asarray([0.0], np.float32), ignore_eos=np.asarray([True]))

    _at_once(one, len(prompts))
    assert {i: o["output_ids"].tolist() for i, o in out.items()} == _greedy(calibrated, prompts, lengths)
    assert all(0 < o["ttft_ms"][0] <= o["total_ms"][0] for o in out.values())
    counters = triton_front.ctx.admission.controller.counters()
    assert counters["admits"] == len(prompts) and counters["running"] == 0
    assert counters["late"] + counters["on_time"] == len(prompts)  # each judged when this front end delivered it


def test_a_request_is_late_as_delivered_not_as_the_engine_finished_it(triton_front: Any) -> None:
    from trt_latency.serving.engine_loop import GenRequest
    from trt_latency.serving.http_app import Slo

    adm = triton_front.ctx.admission
    slo = Slo(20.0, 10.0, "request slo_ms")
    now = time.perf_counter()
    seen = []
    for age_s in (0.050, 0.005):  # delivered 50 ms and 5 ms after arrival; the engine finished at 4 ms in both
        g = GenRequest("r", [1, 2], 2, lambda ev: None, arrival=now - age_s, slo=slo)
        g.first_token_at, g.finished_at, g.finish_reason = g.arrival + 0.002, g.arrival + 0.004, "length"
        adm.delivered(g)
        c = adm.controller.counters()
        seen.append((c["late"], c["on_time"]))
    assert seen == [(1, 0), (1, 1)]  # within its SLO at the engine, late as its client saw it
    assert adm.metrics.delivery_lag_ms.summary()["n"] == 2 and adm.metrics.delivery_lag_ms.summary()["p99"] >= 40
    g = GenRequest("c", [1], 2, lambda ev: None, slo=slo)
    g.finished_at, g.finish_reason = time.perf_counter(), "cancelled"
    adm.delivered(g)  # a cancelled request has no outcome
    assert (adm.controller.counters()["late"], adm.controller.counters()["on_time"]) == (1, 1)


def test_triton_front_rejects_with_why_and_names_bad_inputs(triton_front: Any) -> None:
    from trt_latency.serving.triton_front import AdmissionRejected, BadInput

    ok = {"input_ids": np.asarray([5, 6, 7]), "max_tokens": np.asarray([64], np.int32),
          "slo_ms": np.asarray([0.01], np.float32)}
    with pytest.raises(AdmissionRejected) as info:
        triton_front(**ok)
    assert info.value.info["budget_ms"] == pytest.approx(0.01, rel=1e-3) and info.value.info["reason"]
    assert info.value.info["predicted_ms"] > 0.01 and isinstance(info.value.info["max_tokens_that_fit"], int)
    assert "rejected at admission" in str(info.value) and '"reason"' in str(info.value)
    for change, name in ((dict(input_ids=np.asarray([], np.int64)), "input_ids"),
                         (dict(input_ids=np.asarray([5, 100000])), "input_ids"),
                         (dict(max_tokens=np.asarray([0], np.int32)), "max_tokens"),
                         (dict(max_tokens=np.asarray([1, 2], np.int32)), "max_tokens"),
                         (dict(max_tokens=None), "max_tokens"),
                         (dict(slo_ms=np.asarray([np.nan], np.float32)), "slo_ms")):
        with pytest.raises(BadInput, match=f"input '{name}'"):
            triton_front(**{k: v for k, v in {**ok, **change}.items() if v is not None})
    assert triton_front.ctx.engine.alive  # nothing reached the engine, which still serves
    r = triton_front(**{**ok, "max_tokens": np.asarray([2], np.int32), "slo_ms": np.asarray([0.0], np.float32)})
    assert r["output_ids"].size == 2
