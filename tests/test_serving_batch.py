"""Batch-aware admission: the closed form against a step-by-step simulation of the contract's T(B, X),
the compiled module against the pure-Python reference (hypothesis), and the controller's event tracking."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trt_latency.estimator.batch_model import batch_step_ms, section_from_decode
from trt_latency.serving import batch_reference as ref

try:
    from trt_latency.serving import _batch
except ImportError:  # pragma: no cover - depends on the build
    _batch = None

compiled = pytest.mark.skipif(_batch is None, reason="serving/_batch.pyx not built (no compiler here)")


def synthetic_section(kv_read: str = "padded", sizes: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """A DistServe-shaped batch section: a + b X + c B per size, with a kink (monotone in X and B)."""
    curves = []
    for b in sizes:
        xs = [0.0, 256.0 * b, 1024.0 * b, 4096.0 * b]
        vs = [2.0 + 0.05 * b + 0.0006 * x + (0.0003 * (x - 1024.0 * b) if x > 1024.0 * b else 0.0) for x in xs]
        curves.append({"batch": b, "knots_x": xs, "values_ms": vs})
    return {"kv_read": kv_read, "prefill_with_batch": "separate", "sizes": list(sizes), "curves": curves,
            "valid_x": [1.0, 4096.0 * sizes[-1]]}


PREFILL = (1.5, 0.01, 1e-6)


def simulate(section: dict, kv: list[float], left: list[float]) -> list[float]:
    """Finish times by stepping the batch one decode step at a time with the contract's batch_step_ms."""
    kv = list(kv)
    left = list(left)
    done = [0.0 if r <= 0 else math.nan for r in left]
    t = 0.0
    while any(r > 0 for r in left):
        active = [i for i, r in enumerate(left) if r > 0]
        t += batch_step_ms(section, [kv[i] for i in active])
        for i in active:
            kv[i] += 1
            left[i] -= 1
            if left[i] == 0:
                done[i] = t
    return done


@pytest.mark.parametrize("kv_read", ["padded", "packed"])
def test_closed_form_equals_step_by_step(kv_read: str) -> None:
    rng = np.random.default_rng(3)
    section = synthetic_section(kv_read)
    tables = ref.build_batch_tables(section, PREFILL)
    for _ in range(30):
        m = int(rng.integers(1, 14))
        kv = [float(v) for v in rng.integers(1, 3000, m)]
        left = [float(v) for v in rng.integers(0, 60, m)]
        kv, left, _ = ref.sort_running(kv, left, [0.0] * m)
        got, _ = ref.finish_times(tables, kv, left)
        want = simulate(section, kv, left)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        # With a newcomer: its total and every running request's finish, against stepping the merged batch.
        prompt, n = float(rng.integers(1, 3000)), int(rng.integers(1, 70))
        merged = simulate(section, [*kv, prompt], [*left, n - 1.0])
        stall = ref.prefill_ms(tables, prompt)
        deadline = [merged[k] + stall - 1e-6 if k % 2 else merged[k] + stall + 1e-6 for k in range(m)]
        pred, pushed, _ = ref.judge(tables, left, deadline, ref.prepare(tables, kv, left), prompt, float(n), 1.0, True)
        assert pred == pytest.approx(stall + merged[m], rel=1e-9)
        late = [merged[k] + stall > deadline[k] and got[k] <= deadline[k] for k in range(m)]
        assert pushed == sum(late)


def test_single_request_reduces_to_the_decode_model() -> None:
    """B = 1 without a batch section: the finish time is the decode model's sum over positions."""
    knots, values = [16.0, 128.0, 512.0], [1.0, 1.5, 3.0]
    section = section_from_decode(knots, values)
    tables = ref.build_batch_tables(section, (2.0, 0.01, 0.0))
    d = ref.decide(tables, [], [], [], 0.0, prompt=100.0, max_new=40, budget=1e9)

    def step(L: float) -> float:
        if L <= knots[0]:
            return values[0]
        return float(np.interp(L, knots, values)) if L <= knots[-1] else values[-1] + (L - knots[-1]) * (1.5 / 384)

    want = 2.0 + 0.01 * 100 + sum(step(100 + j) for j in range(39))
    assert d.admit and d.predicted_ms == pytest.approx(want, rel=1e-12)


def test_protect_rejects_what_pushes_a_running_request_past_its_deadline() -> None:
    tables = ref.build_batch_tables(synthetic_section(), PREFILL)
    kv, left = [500.0, 800.0], [5.0, 30.0]
    without, _ = ref.finish_times(tables, kv, left)
    deadline = [without[0] * 1.01, 1e9]  # the first finishes just in time alone
    d = ref.decide(tables, kv, left, deadline, 0.0, prompt=2000.0, max_new=20, budget=1e9)
    assert not d.admit and d.code // 2 == ref.BST_PUSHES and d.pushed == 1
    loose = ref.decide(tables, kv, left, deadline, 0.0, prompt=2000.0, max_new=20, budget=1e9, protect=False)
    assert loose.admit
    # A running request already late without the newcomer does not block it.
    late = ref.decide(tables, kv, left, [without[0] * 0.5, 1e9], 0.0, prompt=2000.0, max_new=20, budget=1e9)
    assert late.admit


def test_protect_gives_up_a_request_late_at_its_expected_pace() -> None:
    """The give-up test prices the running request's finish without the newcomer at ``center`` (the
    controller's median bias), not at the raw model: a request the raw model has on time but that at 3x its
    model (how fast this server runs) misses anyway blocks no newcomer, and one on time at 3x still does."""
    tables = ref.build_batch_tables(synthetic_section(), PREFILL)
    kv, left = [500.0, 800.0], [5.0, 30.0]
    without, _ = ref.finish_times(tables, kv, left)
    args = dict(prompt=2000.0, max_new=20, budget=1e9, factor=3.3)
    at_risk = [without[0] * 1.5, 1e9]  # on time raw, late at 3x
    assert not ref.decide(tables, kv, left, at_risk, 0.0, **args).admit  # the raw model protects it
    gave_up = ref.decide(tables, kv, left, at_risk, 0.0, center=3.0, **args)
    assert gave_up.admit and gave_up.pushed == 0
    on_time = [without[0] * 3.1, 1e9]  # on time at 3x; the newcomer's stall pushes it past at 3.3x
    kept = ref.decide(tables, kv, left, on_time, 0.0, center=3.0, **args)
    assert not kept.admit and kept.pushed == 1


def test_max_new_tokens_is_the_exact_inverse() -> None:
    tables = ref.build_batch_tables(synthetic_section("packed"), PREFILL)
    kv, left, dl = ref.sort_running([300.0, 900.0, 1200.0], [10.0, 4.0, 50.0], [1e9, 1e9, 1e9])
    budget = 150.0
    n = ref.max_new_tokens(tables, kv, left, dl, 0.0, prompt=400.0, budget=budget)
    assert n >= 1
    assert ref.decide(tables, kv, left, dl, 0.0, 400.0, n, budget).admit
    assert not ref.decide(tables, kv, left, dl, 0.0, 400.0, n + 1, budget).admit


states = st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 80), st.floats(0.0, 3000.0)), max_size=70)


@compiled
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(running=states, prompt=st.integers(1, 4000), max_new=st.integers(1, 200),
       budget=st.floats(0.0, 3000.0), factor=st.floats(0.8, 2.0), protect=st.booleans(),
       kv_read=st.sampled_from(["padded", "packed"]), sizes=st.sampled_from([(1,), (1, 4), (1, 2, 4, 8)]),
       center=st.floats(0.5, 2.0))
def test_compiled_equals_reference(running, prompt, max_new, budget, factor, protect, kv_read, sizes, center) -> None:
    tables = ref.build_batch_tables(synthetic_section(kv_read, sizes), PREFILL)
    kernel = _batch.BatchKernel(tables)
    kv, left, dl = ref.sort_running([r[0] for r in running], [r[1] for r in running], [r[2] for r in running])
    want = ref.decide(tables, kv, left, dl, 5.0, prompt, max_new, budget, factor, protect, center=center)
    got = kernel.decide(np.asarray(kv), np.asarray(left), np.asarray(dl), 5.0, prompt, max_new, budget, factor,
                        protect, center=center)
    assert got.predicted_ms == pytest.approx(want.predicted_ms, rel=1e-12, abs=1e-12)
    if abs(want.predicted_ms - budget) > 1e-9 * max(1.0, budget):  # off the floating-point boundary
        assert (got.admit, got.max_new_tokens, got.code, got.pushed) == (want.admit, want.max_new_tokens,
                                                                        want.code, want.pushed)
    ft, ext = kernel.finish_times(np.asarray(kv), np.asarray(left))
    rt, rext = ref.finish_times(tables, kv, left)
    np.testing.assert_allclose(ft, rt, rtol=1e-12, atol=1e-12)
    assert ext == rext


@compiled
def test_compiled_judges_most_requests_and_admits_some() -> None:
    """The generated cases above are not all trivially rejected: the share of admits and of
    protect-rejects on a realistic mix, compiled == reference on every one."""
    rng = np.random.default_rng(11)
    tables = ref.build_batch_tables(synthetic_section(), PREFILL)
    kernel = _batch.BatchKernel(tables)
    codes = []
    for _ in range(400):
        m = int(rng.integers(0, 64))
        kv, left, dl = ref.sort_running(list(rng.integers(10, 2000, m).astype(float)),
                                        list(rng.integers(1, 64, m).astype(float)),
                                        list(rng.uniform(50, 800, m)))
        args = (kv, left, dl, 0.0, float(rng.integers(8, 1500)), int(rng.integers(1, 64)), float(rng.uniform(50, 900)))
        want = ref.decide(tables, *args)
        got = kernel.decide(np.asarray(kv), np.asarray(left), np.asarray(dl), *args[3:])
        assert (got.admit, got.max_new_tokens, got.code, got.pushed) == (want.admit, want.max_new_tokens,
                                                                        want.code, want.pushed)
        codes.append(want.code // 2)
    share = np.bincount(codes, minlength=4) / len(codes)
    assert share[ref.BST_FITS] > 0.15 and share[ref.BST_PUSHES] > 0.05 and share[ref.BST_FEWER] > 0.05


def test_batch_step_ms_contract() -> None:
    s = synthetic_section("padded", (1, 4))
    # B = 2 interpolates between the curves of 1 and 4 at X = 2 * max L.
    x = 2 * 300.0
    t1 = batch_step_ms({**s, "sizes": [1], "curves": s["curves"][:1]}, [x])
    t4 = float(np.interp(x, s["curves"][1]["knots_x"], s["curves"][1]["values_ms"]))
    assert batch_step_ms(s, [100.0, 300.0]) == pytest.approx(t1 + (2 - 1) / 3 * (t4 - t1))
    packed = {**s, "kv_read": "packed"}
    assert batch_step_ms(packed, [100.0, 300.0]) < batch_step_ms(s, [100.0, 300.0])


def test_controller_tracks_events_threadsafe() -> None:
    from trt_latency.serving.batch_admission import BatchAdmissionController

    ctl = BatchAdmissionController.from_section(synthetic_section(), PREFILL, alpha=0.1, max_batch=16)
    errors: list[BaseException] = []

    def worker(base: int) -> None:
        try:
            for i in range(40):
                rid = base + i
                d = ctl.decide(rid, prompt=200, max_new_tokens=8, budget_ms=1e6)
                if d.admit:
                    ctl.started(rid, prompt=200, max_new_tokens=8, budget_ms=1e6)
                    ctl.token(rid)
                    ctl.finished(rid, actual_ms=10.0, predicted_ms=9.0)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and ctl.running() == 0
    assert ctl.counters()["decisions"] == 160
    counters = ctl.counters()
    # every score is 10/9: each bucket's scale is that and the quantile of the scaled scores 1, so the factor
    # of every batch size up to max_batch is 10/9
    assert counters["factor"] == pytest.approx(1.0) and counters["factor_source"].startswith("online")
    assert len(counters["correction_by_batch_bucket"]) == 5  # buckets of 1, 2, 3-4, 5-8, 9-16
    assert all(v == pytest.approx(10.0 / 9.0) for v in counters["correction_by_batch_bucket"].values())
    assert all(ctl.base_factor * ctl.correction(b) == pytest.approx(10.0 / 9.0) for b in (1, 2, 5, 16))


def test_online_factor_takes_the_bias_by_batch_size_out_of_the_quantile() -> None:
    """Two batch buckets with different biases (0.6 and 1.2) and the same relative noise: the factor of each is
    its own scale x the quantile of the relative noise, not the pooled quantile (which holds the bias too)."""
    from trt_latency.serving.batch_admission import BatchAdmissionController

    ctl = BatchAdmissionController.from_section(synthetic_section(), PREFILL, alpha=0.1, max_batch=8, window=200,
                                                residual_window=400)
    rng = np.random.default_rng(2)
    noise = rng.lognormal(0.0, 0.1, 400)
    for i, eps in enumerate(noise):
        batch = 1 if i % 2 else 8
        rid = ("r", i)
        for k in range(batch - 1):  # fill the batch so the request is admitted into a batch of that size
            ctl.started(("f", i, k), 50, 4, 1e6, now=0.0)
        ctl.started(rid, 50, 4, 1e6, now=0.0)
        for k in range(batch - 1):
            ctl.finished(("f", i, k))
        ctl.finished(rid, actual_ms=(0.6 if batch == 1 else 1.2) * eps, predicted_ms=1.0)
    q = float(np.quantile(noise, 0.9))
    assert ctl.base_factor * ctl.correction(1) == pytest.approx(0.6 * q, rel=0.08)
    assert ctl.base_factor * ctl.correction(8) == pytest.approx(1.2 * q, rel=0.08)
    pooled = float(np.quantile([(0.6 if i % 2 else 1.2) * e for i, e in enumerate(noise)], 0.9))
    assert ctl.base_factor * ctl.correction(1) < 0.7 * pooled  # the old rule's factor at batch 1 was >= pooled


@pytest.fixture(scope="module")
def cli_cal(tmp_path_factory: pytest.TempPathFactory):
    from helpers.fitted import fit_calibration, write_samples_csv

    return fit_calibration(write_samples_csv(tmp_path_factory.mktemp("fit")))


def test_cli_admit_and_predict_with_running(cli_cal, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from trt_latency.cli import main

    base = ["-c", str(cli_cal), "--text-tokens", "100", "--json"]
    assert main(["predict", *base, "--output-tokens", "8", "--running", "200:5:1e6,50:20"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["batch"] == 3 and len(pred["running_finish_ms_with"]) == 2
    assert all(w > a for w, a in zip(pred["running_finish_ms_with"], pred["running_finish_ms_without"], strict=True))
    assert main(["admit", *base, "--budget-ms", "1e6", "--max-new-tokens", "8", "--running", "200:5"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["admit"] and d["running"] == 1 and d["predicted_ms"] > pred["ttft_ms"]
    # No batch section in this calibration: a batch of 2 is extrapolated from the B = 1 decode model.
    assert d["extrapolated"]
    with pytest.raises(SystemExit) as exc:
        main(["admit", *base, "--budget-ms", "10", "--running", "200:x"])
    assert exc.value.code == 2


@compiled
def test_compiled_controller_equals_python_controller_through_events() -> None:
    """The compiled BatchState (decide without a lock) and the Python path, on one random event stream."""
    from trt_latency.serving.batch_admission import BatchAdmissionController, BatchEstimator

    section = synthetic_section("padded")
    fast = BatchAdmissionController(BatchEstimator(section, PREFILL, pure_python=False), alpha=None, max_batch=12)
    slow = BatchAdmissionController(BatchEstimator(section, PREFILL, pure_python=True), alpha=None, max_batch=12)
    assert fast._state is not None and slow._state is None
    rng = np.random.default_rng(5)
    running: list[int] = []
    now = 0.0
    admitted = 0
    for rid in range(300):
        now += float(rng.uniform(0, 30))
        args = (rid, int(rng.integers(1, 2000)), int(rng.integers(1, 60)), float(rng.uniform(20, 900)))
        a, b = fast.decide(*args, now=now, want_fit=True), slow.decide(*args, now=now, want_fit=True)
        assert (a.admit, a.max_new_tokens, a.code, a.pushed) == (b.admit, b.max_new_tokens, b.code, b.pushed)
        assert a.predicted_ms == pytest.approx(b.predicted_ms, rel=1e-12, nan_ok=True)
        if a.admit:
            admitted += 1
            for c in (fast, slow):
                c.started(*args, now=now)
            running.append(rid)
        event = rng.integers(3)
        if event == 0:
            for c in (fast, slow):
                c.step()
        elif event == 1 and running:
            rid_t = running[int(rng.integers(len(running)))]
            for c in (fast, slow):
                c.token(rid_t)
        elif running:
            gone = running.pop(int(rng.integers(len(running))))
            for c in (fast, slow):
                c.finished(gone, 12.0, 10.0)
        assert fast.running() == slow.running() == len(running)
    assert 30 < admitted < 270
    assert fast.counters()["decisions"] == slow.counters()["decisions"] == 300


LOOP = (0.7, 1.1, 0.002, 0.3, 0.004)  # o per decode step, c0 + c1 P after a prefill, o_p + o_p1 P on the prefill (ms)


@pytest.mark.parametrize("kv_read", ["padded", "packed"])
def test_loop_terms_price_every_step_and_the_prefill(kv_read: str) -> None:
    """With the serving-loop terms the closed form equals stepping the batch at T(B, X) + o per step, after a
    stall of prefill + o_p(P) + c(P); the newcomer's TTFT is prefill + o_p(P)."""
    rng = np.random.default_rng(7)
    section = synthetic_section(kv_read)
    engine = ref.build_batch_tables(section, PREFILL)
    served = ref.build_batch_tables(section, PREFILL, loop=LOOP)
    o, c0, c1, o_p, o_p1 = LOOP
    for _ in range(30):
        m = int(rng.integers(0, 12))
        kv, left, _ = ref.sort_running([float(v) for v in rng.integers(1, 3000, m)],
                                       [float(v) for v in rng.integers(0, 60, m)], [0.0] * m)
        got, _ = ref.finish_times(served, kv, left)
        np.testing.assert_allclose(got, [t + o * r for t, r in zip(simulate(section, kv, left), left, strict=True)],
                                   rtol=1e-9, atol=1e-9)
        prompt, n = float(rng.integers(1, 3000)), int(rng.integers(1, 70))
        stall = ref.prefill_ms(engine, prompt) + o_p + o_p1 * prompt + c0 + c1 * prompt
        merged = simulate(section, [*kv, prompt], [*left, n - 1.0])
        pred, pushed, _ = ref.judge(served, left, [1e12] * m, ref.prepare(served, kv, left), prompt, float(n), 1.0,
                                    True)
        assert pred == pytest.approx(stall + merged[m] + o * (n - 1), rel=1e-9)
        assert pushed == 0
        assert ref.ttft_ms(served, prompt) == pytest.approx(ref.prefill_ms(engine, prompt) + o_p + o_p1 * prompt,
                                                         rel=1e-12)
        assert ref.ttft_ms(engine, prompt) == ref.prefill_ms(engine, prompt)
    with pytest.raises(ValueError, match="serving-loop terms"):
        ref.build_batch_tables(section, PREFILL, loop=(-1.0, 0.0, 0.0, 0.0, 0.0))


@compiled
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(running=states, prompt=st.integers(1, 4000), max_new=st.integers(1, 200),
       budget=st.floats(0.0, 3000.0), factor=st.floats(0.8, 2.0), protect=st.booleans(),
       kv_read=st.sampled_from(["padded", "packed"]), sizes=st.sampled_from([(1,), (1, 4), (1, 2, 4, 8)]),
       loop=st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 5.0), st.floats(0.0, 0.01), st.floats(0.0, 5.0),
                      st.floats(0.0, 0.5)))
def test_compiled_equals_reference_with_loop_terms(running, prompt, max_new, budget, factor, protect, kv_read, sizes,
                                                   loop) -> None:
    tables = ref.build_batch_tables(synthetic_section(kv_read, sizes), PREFILL, loop=loop)
    kernel = _batch.BatchKernel(tables)
    kv, left, dl = ref.sort_running([r[0] for r in running], [r[1] for r in running], [r[2] for r in running])
    want = ref.decide(tables, kv, left, dl, 5.0, prompt, max_new, budget, factor, protect)
    got = kernel.decide(np.asarray(kv), np.asarray(left), np.asarray(dl), 5.0, prompt, max_new, budget, factor,
                        protect)
    assert got.predicted_ms == pytest.approx(want.predicted_ms, rel=1e-12, abs=1e-12)
    if abs(want.predicted_ms - budget) > 1e-9 * max(1.0, budget):
        assert (got.admit, got.max_new_tokens, got.code, got.pushed) == (want.admit, want.max_new_tokens,
                                                                        want.code, want.pushed)
    np.testing.assert_allclose(kernel.finish_times(np.asarray(kv), np.asarray(left))[0],
                               ref.finish_times(tables, kv, left)[0], rtol=1e-12, atol=1e-12)


def test_batch_estimator_takes_the_calibrations_loop_terms() -> None:
    """serving=True reads the config's fitted serving_loop (the server's model); the default is the engine alone."""
    from pathlib import Path

    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.model import Estimator
    from trt_latency.serving.batch_admission import BatchEstimator

    est = Estimator(load_calibration(Path(__file__).parent / "data" / "calibration" / "calibration.yaml"))
    engine = BatchEstimator.from_estimator(est)
    served = BatchEstimator.from_estimator(est, serving=True)
    sl = est.serving_loop()
    assert sl.decode_step_ms > 0 and sl.first_step_ms > 0  # the fixture's replay fitted them
    assert engine.loop == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert served.loop == (sl.decode_step_ms, sl.first_step_ms, sl.first_step_per_token_ms, sl.prefill_ms,
                           sl.prefill_per_token_ms)
    n = 20
    extra = sl.prefill_ms + sl.first_ms(100) + sl.decode_step_ms * (n - 1)
    assert served.total_with([], 100, n) == pytest.approx(engine.total_with([], 100, n) + extra, rel=1e-9)
    assert served.ttft_ms(100) == pytest.approx(engine.ttft_ms(100) + sl.prefill_ms, rel=1e-12)
    # The same loop semantics as the single-request Estimator's serving prediction.
    single = est.predict(0, 100, n).total_ms - est.predict(0, 100, n, serving=False).total_ms
    assert extra == pytest.approx(single, rel=1e-9)
