"""`calibrate --ray` on a real local Ray (2 CPUs, two actors, two configs each): the same files, rows and fit
as the sequential run; an actor killed mid-sweep is restarted and its item re-run without a row lost or
duplicated. One Ray start-up (~15 s on the shared 2-core machine) serves the whole module."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trt_latency.cluster import ACTOR_PREFIX, calibrate_on_ray
from trt_latency.pipeline import CalibrateOptions, calibrate

PLAN = """\
schema_version: 1
tiers:
  - {{tier_idx: 0, name: tiny, hidden: 64, layers: 2, heads: 2, kv_heads: 1, head_dim: 32, intermediate: 128,
     vocab: 128, experts: 1, dtype: float32, max_past_len: 256, max_prefill_len: 64}}
  - {{tier_idx: 1, name: tiny-wide, hidden: 64, layers: 2, heads: 2, kv_heads: 1, head_dim: 32, intermediate: 256,
     vocab: 128, experts: 1, dtype: float32, max_past_len: 256, max_prefill_len: 64}}
configs:
{configs}
runtime: {{intra_op_threads: 1, inter_op_threads: 1}}
sweep:
  decode: {{log_points: 4, linear_points: 3, reps: {reps}, warmup: 1}}
  prefill: {{lengths: [4, 16, 48], reps: 3}}
  seed: 0
replay:
  requests: 6
  vision_tokens: [0, 8]
  text_tokens: [4, 24]
  output_tokens: [2, 12]
  seed: 0
"""
FOUR = """\
  - {tier_idx: 0, top_k: 1, num_active_blocks: 2}
  - {tier_idx: 0, top_k: 1, num_active_blocks: 1}
  - {tier_idx: 1, top_k: 1, num_active_blocks: 2}
  - {tier_idx: 1, top_k: 1, num_active_blocks: 1}"""
TWO = "\n".join(FOUR.splitlines()[:2])


@pytest.fixture(scope="module")
def local_ray() -> Any:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install \"trt-latency[cluster]\")")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_flag_without_ray_says_how_to_install(tmp_path: Path) -> None:
    """Ray made unimportable in a fresh interpreter: one line naming the extra, exit 1, nothing written."""
    code = ("import sys; sys.modules['ray'] = None; from trt_latency.cli import main; "
            f"sys.exit(main(['calibrate', '--ray', '--out', {str(tmp_path / 'out')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc
    assert proc.stderr.strip().splitlines() == [
        'trt-latency calibrate: error: --ray needs Ray, which is not installed: pip install "trt-latency[cluster]"']
    assert not (tmp_path / "out").exists()


def _keys(path: Path) -> list[tuple[Any, ...]]:
    with path.open(newline="") as fh:
        return [(int(r["tier_idx"]), int(r["top_k"]), int(r["num_active_blocks"]), r["phase"], int(r["past_len"]),
                 int(r["new_tokens"]), int(r["rep"])) for r in csv.DictReader(fh)]


def _request_ids(path: Path) -> list[int]:
    with path.open(newline="") as fh:
        return [int(r["request_id"]) for r in csv.DictReader(fh)]


def _device_folder(out: Path) -> Path:
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders  # one device class on this machine
    return folders[0]


@pytest.mark.slow
def test_ray_matches_the_sequential_run(local_ray: Any, tmp_path: Path) -> None:
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.model import Estimator

    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.format(configs=FOUR, reps=12))
    opts = CalibrateOptions(config=str(plan), no_plot=True, no_progress=True)
    seq = tmp_path / "seq"
    calibrate(CalibrateOptions(**{**opts.__dict__, "out": str(seq)}), say=lambda _: None)
    lines: list[str] = []
    results = calibrate_on_ray(CalibrateOptions(**{**opts.__dict__, "out": str(tmp_path / "ray")}),
                               say=lines.append)
    dev = _device_folder(tmp_path / "ray")
    assert [r.out for r in results] == [dev]
    assert any("4 work item(s) (model, config) on 2 Ray actor(s)" in line for line in lines), lines
    assert sorted(p.name for p in seq.iterdir()) == sorted(p.name for p in dev.iterdir())
    seq_rows, ray_rows = _keys(seq / "samples.csv"), _keys(dev / "samples.csv")
    assert len(ray_rows) == len(set(ray_rows)) and set(ray_rows) == set(seq_rows)
    assert sorted(_request_ids(dev / "requests.csv")) == sorted(_request_ids(seq / "requests.csv"))

    # The fits agree within the noise the sweeps record: per config, the median over positions of
    # |T_ray - T_seq| / T_seq in units of the two medians' combined standard error is at most 3, once a
    # common level is taken out: two actors share this machine's 2 cores with Ray's own processes, so a
    # Ray run can be uniformly slower than the sequential one (a level shift, bounded below), while the
    # shape over positions (what the fit is for) must agree within the recorded noise.
    a, b = load_calibration(seq / "calibration.yaml"), load_calibration(dev / "calibration.yaml")
    ea, eb = Estimator(a), Estimator(b)
    assert {c.key for c in a.configs} == {c.key for c in b.configs}
    for ca in a.configs:
        cb = next(c for c in b.configs if c.key == ca.key)
        pos = ca.fit_error["positions"]
        assert pos == cb.fit_error["positions"]
        se = np.hypot(np.array(ca.fit_error["position_se_rel"], dtype=float),
                      np.array(cb.fit_error["position_se_rel"], dtype=float))
        ya = np.array([ea.decode_step_ms(p, *ca.key, serving=False) for p in pos])
        yb = np.array([eb.decode_step_ms(p, *ca.key, serving=False) for p in pos])
        # The level is bounded loosely: besides the shared cores, the actors are fresh processes and this
        # one is pytest's, and a tiny model's step depends on its page backing by up to 2x between processes
        # (docs/decisions.md, 10); what must agree is the shape.
        level = float(np.median(yb / ya))
        assert 0.33 <= level <= 3.0, (ca.key, level)
        z = np.abs(yb / level - ya) / ya / se
        assert float(np.median(z)) <= 3.0, (ca.key, level, z)

    # A rerun into the same folder measures nothing: every row is there already.
    again: list[str] = []
    calibrate_on_ray(CalibrateOptions(**{**opts.__dict__, "out": str(tmp_path / "ray")}), say=again.append)
    assert _keys(dev / "samples.csv") == ray_rows
    assert any("rows dropped as already written: 0" in line for line in again), again


@pytest.mark.slow
def test_killed_actor_is_restarted_and_no_row_is_lost_or_doubled(local_ray: Any, tmp_path: Path) -> None:
    ray = local_ray
    from trt_latency.engines.config import load_plan
    from trt_latency.engines.sweep import plan_rows

    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(PLAN.format(configs=TWO, reps=1200))  # a few seconds per item: time to kill one
    out = tmp_path / "ray"
    opts = CalibrateOptions(config=str(plan_path), out=str(out), no_plot=True, no_progress=True, no_replay=True)
    lines: list[str] = []
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            calibrate_on_ray(opts, say=lines.append)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test below
            errors.append(exc)

    thread = threading.Thread(target=drive)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        samples = [p / "samples.csv" for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
        if samples and samples[0].is_file() and sum(1 for _ in samples[0].open()) > 50:  # rows are streaming in
            names = sorted(n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX))
            killed = names[0]
            ray.kill(ray.get_actor(killed), no_restart=False)
        time.sleep(0.05)
    thread.join(timeout=180)
    assert not errors, errors
    assert killed is not None, "the sweep ended before an actor could be killed"
    assert any("resent after an actor restart" in line for line in lines), lines

    rows = _keys(_device_folder(out) / "samples.csv")
    assert not [k for k, n in Counter(rows).items() if n > 1]
    plan = load_plan(plan_path)
    planned = {(*key, r.phase, r.past_len, r.new_tokens, r.rep)
               for key in plan.configs for r in plan_rows(plan.tier(key.tier_idx), plan.sweep)}
    assert set(rows) == planned


def test_a_node_without_the_model_path_gets_it_from_the_object_store(local_ray: Any, tmp_path: Path) -> None:
    """An actor on another node cannot see the driver's path: the item's files come through Ray's store."""
    from trt_latency.cluster import Item, _local_model, _model_files

    model = tmp_path / "m" / "decoder.onnx"
    model.parent.mkdir()
    model.write_bytes(b"graph")
    (model.parent / "decoder.onnx.data").write_bytes(b"weights")
    (model.parent / "other.onnx").write_bytes(b"not this one")
    files = local_ray.put(_model_files(model))
    here = Item(index=0, calibration=0, position=0, key=(0, 1, 1), tier=None, path=str(model), files=files)
    assert _local_model(here) == model  # visible: used in place
    gone = tmp_path / "elsewhere" / "decoder.onnx"
    there = _local_model(Item(index=7, calibration=0, position=0, key=(0, 1, 1), tier=None, path=str(gone),
                              files=files))
    assert there != gone and there.name == "decoder.onnx" and there.read_bytes() == b"graph"
    assert sorted(p.name for p in there.parent.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]


def _batch_shapes(path: Path) -> dict[tuple[int, ...], int]:
    """(config, batch, kv_max, kv_total) -> rounds of the batched rows in samples.csv."""
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["batch"]) > 1]
    return dict(Counter((int(r["tier_idx"]), int(r["top_k"]), int(r["num_active_blocks"]), int(r["batch"]),
                         int(r["kv_max"]), int(r["kv_total"])) for r in rows))


@pytest.mark.slow
def test_ray_runs_the_plans_batch_sweep_as_the_local_run(local_ray: Any, tmp_path: Path) -> None:
    """The default plan (--quick, a short budget): --ray measures the batch sweep too, through the same
    pipeline.measure, into the same shapes and columns, and records the memory provenance."""
    from dataclasses import replace

    from trt_latency.engines.sweep import MIN_ROUNDS
    from trt_latency.estimator.calibration import load_calibration

    opts = CalibrateOptions(quick=True, time_budget=15, requests=6, no_plot=True, no_progress=True)
    calibrate(replace(opts, out=str(tmp_path / "local")), say=lambda _: None)
    calibrate_on_ray(replace(opts, out=str(tmp_path / "ray")), say=lambda _: None)
    dev = _device_folder(tmp_path / "ray")
    local, ray = _batch_shapes(tmp_path / "local" / "samples.csv"), _batch_shapes(dev / "samples.csv")
    assert local and set(ray) == set(local)
    assert min(ray.values()) >= MIN_ROUNDS and min(local.values()) >= MIN_ROUNDS
    assert (dev / "samples.csv").read_text().splitlines()[0] == \
        (tmp_path / "local" / "samples.csv").read_text().splitlines()[0]
    a, b = load_calibration(tmp_path / "local" / "calibration.yaml"), load_calibration(dev / "calibration.yaml")
    assert a.configs[0].batch is not None and b.configs[0].batch is not None
    assert a.configs[0].batch["sizes"] == b.configs[0].batch["sizes"]
    assert b.provenance["memory"] and b.provenance["threads"] == a.provenance["threads"]


@pytest.mark.slow
def test_ray_calibrates_the_vlm_chain_as_the_local_run(local_ray: Any, tmp_path: Path) -> None:
    """The VLM fixture chain (tests/test_vlm.py's): --ray sweeps the encoder and replays requests through
    encoder -> embedding -> decoder, writing the same vision rows and request rows as the local run."""
    from dataclasses import replace

    from trt_latency.estimator.calibration import load_calibration

    data = Path(__file__).parent / "data"
    vit = data / "vlm" / "vit"
    opts = CalibrateOptions(quick=True, requests=6, no_plot=True, no_progress=True, vision_onnx=str(vit / "vision.onnx"),
                            embedding_onnx=str(vit / "embedding.onnx"), vision_patches=(16, 256), vision_points=4)
    decoder = str(data / "thirdparty" / "genai-llama-embeds" / "model.onnx")
    calibrate(replace(opts, onnx=decoder, out=str(tmp_path / "local")), say=lambda _: None)
    calibrate_on_ray(replace(opts, out=str(tmp_path / "ray")), models=[decoder], say=lambda _: None)
    dev = _device_folder(tmp_path / "ray")

    def vision_rows(path: Path) -> set[tuple[str, ...]]:
        with path.open(newline="") as fh:
            return {(r["stage"], r["images"], r["patches"], r["tokens"]) for r in csv.DictReader(fh)}

    def request_rows(path: Path) -> list[tuple[str, ...]]:
        with path.open(newline="") as fh:
            return sorted((r["request_id"], r["vision_tokens"], r["text_tokens"], r["output_tokens"], r["images"])
                          for r in csv.DictReader(fh))

    assert vision_rows(dev / "vision_samples.csv") == vision_rows(tmp_path / "local" / "vision_samples.csv")
    assert request_rows(dev / "requests.csv") == request_rows(tmp_path / "local" / "requests.csv")
    assert any(int(r[1]) > 0 for r in request_rows(dev / "requests.csv"))  # requests with images ran the chain
    a, b = load_calibration(tmp_path / "local" / "calibration.yaml"), load_calibration(dev / "calibration.yaml")
    assert a.vision is not None and b.vision is not None and set(b.vision.fits) == set(a.vision.fits) == {1, 2}


def test_vision_on_a_cluster_by_address_fails_at_the_start(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="ray is not installed")
    from trt_latency.errors import ConfigError

    opts = CalibrateOptions(out=str(tmp_path / "o"), vision_onnx="vision.onnx")
    with pytest.raises(ConfigError, match="--vision-onnx"):
        calibrate_on_ray(opts, address="10.0.0.1:6379", say=lambda _: None)
    assert not (tmp_path / "o").exists()
