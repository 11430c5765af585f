"""`calibrate --ray`: the plan's (model, config) work items measured by Ray actors, one per device; the
driver is the single writer of every file.

    from trt_latency.cluster import calibrate_on_ray
    results = calibrate_on_ray(CalibrateOptions(out="out"), models=[], address=None)

Work item = one config of one model: the actor runs trt_latency/pipeline.measure on it, the same phases
as the local run (pilot, sweep, the plan's batch sweep and the VLM chain's encoder sweep on the primary
config, the replay), with sinks (engines/sweep.RowSink, engines/replay.RequestSink) that hand rows to a
queue; the actor's method is a Ray streaming generator that yields them in half-second chunks. The
encoder sweep's vision_samples.csv (redone whole, as on one machine) travels as the file's bytes. The driver
appends each chunk to DIR/<device>/samples.csv / requests.csv (the rows' own device column decides the
folder) through the same file sinks the single-machine path uses, so a rerun resumes exactly as there:
the driver sends every item the rows already in each device folder, and the actor continues from the
ones of its own device.

Faults: an actor that dies is restarted by Ray (max_restarts) and the driver sends it the interrupted
item again, with the rows on disk by then, so the item continues where it stopped (a rerun's resume).
Not Ray's own task retry (max_task_retries): a retried streaming generator is replayed by yield index
(Ray skips the first k yields of the new attempt as already consumed), which assumes the generator is
deterministic; a sweep's chunks are timed and the adaptive sweep's order follows its measurements, so
the skipped yields would hold other rows than the consumed ones (rows lost). The driver also drops
every row whose key (config, phase, past_len, new_tokens, rep) or request_id its folder already holds:
nothing is written twice. Rows reach the disk as they arrive, in the single-machine writer's
half-second fsync'ed groups: Ctrl-C leaves what was measured.

The fit runs on the driver per device folder with trt_latency/pipeline.finish, as the local run's.
Not supported, refused at the start in one line: --vision-onnx on a cluster joined by address (the encoder
files are not shipped to other nodes, as the decoder's are).

Several models (repeatable --onnx / --engine): each is its own calibration in DIR/<model name>/ (two
user models may share a config key, and each has its own tiers), with its device folders inside.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trt_latency.errors import TrtLatencyError

INSTALL_HINT = '--ray needs Ray, which is not installed: pip install "trt-latency[cluster]"'
GPU_BACKENDS = ("ort-cuda", "ort-trt", "tensorrt")
CHUNK_SECONDS = 0.5  # rows per streamed chunk: as often as the single-machine writer syncs its groups
MAX_RESTARTS = 4  # per actor (Ray restarts it); and how often one item may be re-sent after a death
ACTOR_PREFIX = "trt-latency-worker"


class RayUnavailable(TrtLatencyError):
    """--ray without the `ray` package."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailable(INSTALL_HINT) from None
    return ray


def device_folder(device: str) -> str:
    """A device class as a folder name: 'cpu:Intel(R) Xeon(R) ...' -> 'cpu-Intel-R-Xeon-R-...'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", device).strip("-") or "device"


def model_names(paths: list[str]) -> list[str]:
    """One folder name per model: its stem, or parent-stem where stems collide (genai/model.onnx)."""
    stems = [Path(p).stem for p in paths]
    names = [s if stems.count(s) == 1 else f"{Path(p).parent.name}-{s}" for s, p in zip(stems, paths, strict=True)]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


# ------------------------------------------------------------------------------------------ work items


@dataclass
class Item:
    """One (model, config): what an actor measures, and the rows already done per device folder."""

    index: int
    calibration: int  # which model's calibration (its folder)
    position: int  # the config's index in its calibration (replay request_ids position * REPLAY_ID_STRIDE)
    key: Any
    tier: Any
    path: str
    files: Any = None  # ObjectRef of {name: bytes}: the model's files, for an actor that cannot see `path`
    work: Any = None  # pipeline.MeasurePlan: the phases pipeline.measure runs for this config
    done_rows: dict[str, Any] = field(default_factory=dict)  # device folder -> {PlannedRow: ms}
    done_batch: dict[str, Any] = field(default_factory=dict)  # device folder -> {(batch, kv_max, kv_total, rep)}
    done_state: dict[str, Any] = field(default_factory=dict)  # device folder -> side-file targets
    done_requests: dict[str, Any] = field(default_factory=dict)  # device folder -> {request_id: key}
    deadline_wall: float | None = None  # time.time() at which the item's phases end (pipeline.measure)


class _QueueSink:
    """The actor's RowSink: rows of its device go into a queue the generator drains; resume state is
    what the driver sent for this device folder (``folder``, set once the runner says its device)."""

    def __init__(self, q: queue.Queue[Any], item: Item) -> None:
        self.q = q
        self.item = item
        self.folder = ""
        self.path = Path("samples.csv")
        self.appended: dict[Any, float] = {}
        self.appended_batch: set[tuple[int, int, int, int]] = set()

    def bind(self, folder: str) -> None:
        self.folder = folder
        self.path = Path(folder) / "samples.csv"

    def rows(self, key: Any, backend: str) -> dict[Any, float]:
        from trt_latency.engines.sweep import PlannedRow

        done = dict(self.item.done_rows.get(self.folder, {}))
        for values, ms in self.appended.items():
            done[PlannedRow(*values)] = ms
        return done

    def batch_rows(self, key: Any, backend: str) -> set[tuple[int, int, int, int]]:
        return set(self.item.done_batch.get(self.folder, set())) | self.appended_batch

    def append(self, values: list[Any]) -> None:
        if int(values[3]) > 1:  # a batched step: (batch, kv_max, kv_total, rep)
            self.appended_batch.add((int(values[3]), int(values[13]), int(values[12]), int(values[7])))
        else:
            self.appended[(values[4], int(values[5]), int(values[6]), int(values[7]))] = float(values[8])
        self.q.put(("samples", values))

    def close(self) -> None:
        return None

    def read_state(self, key: Any) -> dict[Any, Any]:
        return dict(self.item.done_state.get(self.folder, {}))

    def write_state(self, key: Any, positions: list[Any]) -> None:
        self.q.put(("state", (self.folder, tuple(key), positions)))


class _QueueRequestSink:
    """The actor's RequestSink: request rows into the queue; done ids as the driver sent them."""

    def __init__(self, q: queue.Queue[Any], item: Item) -> None:
        self.q = q
        self.item = item
        self.path = Path("requests.csv")
        self.done_ids: dict[int, Any] = {}

    def bind(self, folder: str) -> None:
        self.path = Path(folder) / "requests.csv"
        self.done_ids = dict(self.item.done_requests.get(folder, {}))

    def done(self) -> dict[int, Any]:
        return dict(self.done_ids)

    def append(self, rows: list[dict[str, Any]]) -> None:
        self.q.put(("requests", rows))


class Worker:
    """A Ray actor (ray.remote(Worker)): one device, one runner at a time, rows streamed to the driver."""

    def __init__(self, index: int, threads: int, pin: bool) -> None:
        self.index = index
        self.pinned: list[int] = []
        if pin and hasattr(os, "sched_setaffinity"):
            # Ray reserves a CPU count, not cores: pin actor i to its own `threads` cores of this node so two
            # actors never time on the same core (intra-op threads = the plan's, = num_cpus of the actor).
            n = os.cpu_count() or 1
            cores = sorted({(index * threads + j) % n for j in range(threads)})
            try:
                os.sched_setaffinity(0, cores)
                self.pinned = cores
            except OSError:
                self.pinned = []

    def pid(self) -> int:
        return os.getpid()

    def run(self, item: Item) -> Iterator[list[tuple[str, Any]]]:
        """Measure one item; yields chunks of ("hello" | "samples" | "requests" | "state" | "result", data)."""
        q: queue.Queue[Any] = queue.Queue()
        thread = threading.Thread(target=self._measure, args=(item, q), daemon=True)
        thread.start()
        chunk: list[tuple[str, Any]] = [("hello", {"pid": os.getpid(), "pinned": self.pinned})]
        last = time.monotonic()
        while True:
            try:
                msg = q.get(timeout=max(CHUNK_SECONDS - (time.monotonic() - last), 0.01))
            except queue.Empty:
                msg = None
            if msg is not None:
                if msg[0] == "error":
                    raise msg[1]
                if msg[0] == "end":
                    yield chunk
                    return
                chunk.append(msg)
            if chunk and time.monotonic() - last >= CHUNK_SECONDS:
                yield chunk
                chunk, last = [], time.monotonic()

    def _measure(self, item: Item, q: queue.Queue[Any]) -> None:
        try:
            q.put(("result", _measure_item(item, q)))
            q.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the generator, which re-raises it in Ray
            q.put(("error", exc))


def _local_model(item: Item) -> Path:
    """The item's model here: its own path when this node sees it, else the files shipped in the object store."""
    path = Path(item.path)
    if path.is_file() or item.files is None:
        return path
    import ray

    files = ray.get(item.files)
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"trt-latency-models-{os.getpid()}" / str(item.index)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder / path.name


def _measure_item(item: Item, q: queue.Queue[Any]) -> dict[str, Any]:
    """pipeline.measure for one config on this actor's device (every phase the local run has: sweep, batch
    sweep, encoder sweep, replay): rows go to the queue, the encoder sweep's file as bytes."""
    import tempfile

    from trt_latency.pipeline import Sinks, Target, measure

    target = Target(item.key, item.tier, _local_model(item))
    sink, rsink = _QueueSink(q, item), _QueueRequestSink(q, item)

    def opened(runner: Any) -> None:  # the device names the folder whose rows the item resumes from
        folder = device_folder(runner.device)
        sink.bind(folder)
        rsink.bind(folder)

    with tempfile.TemporaryDirectory(prefix="trt-latency-vision-") as tmp:
        vision = Path(tmp) / "vision_samples.csv"
        sinks = Sinks(samples=sink, requests=rsink if item.work.requests > 0 else None, vision=vision,
                      opened=opened)
        m = measure(target, item.work, sinks, item.deadline_wall, say=lambda _: None)
        if m.vision is not None and vision.is_file():
            q.put(("vision", (sink.folder, vision.read_bytes())))
    return {"folder": sink.folder, "device": m.runner.get("device", ""), "measured": m, "pid": os.getpid()}


# ------------------------------------------------------------------------------------------ driver


@dataclass
class Calibration:
    """One model's calibration: its folder, plan and targets (pipeline.Target)."""

    root: Path
    plan: Any
    targets: list[Any]
    options: Any  # CalibrateOptions for this model


@dataclass(frozen=True)
class ClusterResult:
    """One calibration of one device class."""

    out: Path
    device: str
    calibration: Path
    samples: Path
    requests: Path | None
    rows: int


class _Folder:
    """The driver's writers for one DIR/<device>/ folder, deduplicating by row key / request_id."""

    def __init__(self, path: Path) -> None:
        from trt_latency.engines.replay import FileRequestSink
        from trt_latency.engines.sweep import FileSink

        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.samples = FileSink(path / "samples.csv")
        self.requests = FileRequestSink(path / "requests.csv")
        self.keys: dict[tuple[int, int, int], set[Any]] = {}
        self.request_ids = set(self.requests.done())
        self.added = 0
        self.dropped = 0

    def add_samples(self, rows: list[list[Any]]) -> None:
        from trt_latency.engines.sweep import PlannedRow

        for values in rows:
            key = (int(values[0]), int(values[1]), int(values[2]))
            have = self.keys.get(key)
            if have is None:  # read_rows also refuses a backend other than the one already there
                from trt_latency.schema import ConfigKey

                have = self.keys[key] = set(self.samples.rows(ConfigKey(*key), str(values[9])))
                have.update(("batch", *b) for b in self.samples.batch_rows(ConfigKey(*key), str(values[9])))
            row: Any = PlannedRow(str(values[4]), int(values[5]), int(values[6]), int(values[7]))
            if int(values[3]) > 1:  # a batched step: identified by (batch, kv_max, kv_total, rep)
                row = ("batch", int(values[3]), int(values[13]), int(values[12]), int(values[7]))
            if row in have:
                self.dropped += 1
                continue
            have.add(row)
            self.samples.append(values)
            self.added += 1

    def add_requests(self, rows: list[dict[str, Any]]) -> None:
        fresh = [r for r in rows if int(r["request_id"]) not in self.request_ids]
        self.dropped += len(rows) - len(fresh)
        if fresh:
            self.requests.append(fresh)
            self.request_ids.update(int(r["request_id"]) for r in fresh)

    def close(self) -> None:
        self.samples.close()


def _done_for(item: Item, root: Path) -> None:
    """Every device folder's rows of the item's config, read fresh at dispatch (what is missing is measured)."""
    from trt_latency.engines.adaptive import read_state, state_path
    from trt_latency.engines.batch_sweep import read_done_batch
    from trt_latency.engines.replay import done_requests
    from trt_latency.engines.sweep import read_rows

    item.done_rows, item.done_batch, item.done_state, item.done_requests = {}, {}, {}, {}
    if not root.is_dir():
        return
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        samples = sub / "samples.csv"
        if samples.is_file():
            item.done_rows[sub.name] = read_rows(samples, item.key)
            item.done_batch[sub.name] = read_done_batch(samples, item.key)
            item.done_state[sub.name] = read_state(state_path(samples), tuple(item.key))
        requests = sub / "requests.csv"
        if requests.is_file():
            item.done_requests[sub.name] = done_requests(requests)


def _model_files(path: Path) -> dict[str, bytes]:
    """The model and its side files (external weights: NAME.data, NAME_data, ...) by name."""
    from trt_latency.pipeline import model_files

    return {p.name: p.read_bytes() for p in model_files(path)}


def _calibrations(args: Any, models: list[str], engines: list[str], say: Callable[[str], None]) -> list[Calibration]:
    from trt_latency.engines.config import load_plan
    from trt_latency.pipeline import export_if_needed, sized_budget, targets_for, with_adaptive_flags

    base = with_adaptive_flags(load_plan(args.config, quick=args.quick), args)
    out = Path(args.out)
    sources = [("onnx", m) for m in models] + [("engine", e) for e in engines]
    names = model_names([s for _, s in sources])
    cals: list[Calibration] = []
    if not sources:
        plan, targets = targets_for(replace(args, onnx=None, engine=None), base, out)
        for t in targets:
            t.exported = export_if_needed(t.tier, t.key, t.path, plan.sweep.seed)
            say(f"  model {t.path.name}: {'exported' if t.exported else 'reused (same content hash)'}")
        return [Calibration(out, plan, targets, args)]
    for (kind, src), name in zip(sources, names, strict=True):
        opts = replace(args, onnx=src if kind == "onnx" else None, engine=src if kind == "engine" else None,
                       out=str(out / name) if len(sources) > 1 else str(out))
        plan, targets = targets_for(opts, base, Path(opts.out))
        plan, sized = sized_budget(opts, plan, targets)
        if sized:
            say(f"  {name}: time budget {sized}")
        cals.append(Calibration(Path(opts.out), plan, targets, opts))
    return cals


def _actor_kind(ray: Any, backend: str, threads: int, max_actors: int | None) -> tuple[int, dict[str, Any], bool]:
    """(how many actors, their resources, pin to cores): one per GPU for GPU backends (auto: when the
    cluster has GPUs), else one per `threads` CPUs."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if backend in GPU_BACKENDS or (backend == "auto" and gpus > 0):
        n, opts, pin = gpus, {"num_gpus": 1, "num_cpus": 1}, False
        if n == 0:
            raise TrtLatencyError(f"--backend {backend} needs GPUs and the Ray cluster has none "
                                  f"(resources: {dict(res)})")
    else:
        n, opts, pin = max(int(res.get("CPU", 1)) // max(threads, 1), 1), {"num_cpus": max(threads, 1)}, True
    if max_actors is not None:
        n = min(n, max_actors)
    return max(n, 1), opts, pin


def calibrate_on_ray(args: Any, models: list[str] | None = None, engines: list[str] | None = None,
                     address: str | None = None, say: Callable[[str], None] | None = None,
                     max_actors: int | None = None) -> list[ClusterResult]:
    """Measure every (model, config) on Ray actors, write DIR/<device>/ per model, fit per device class.

    ``address``: None starts a local Ray (unless this process already joined one), "auto" or
    "host:port" joins a running cluster. ``models`` / ``engines``: user decoders (each its own
    calibration); none: the plan's exported models."""
    ray = import_ray()
    say = say or (lambda text: print(text, flush=True))
    started = time.perf_counter()
    models, engines = list(models or []), list(engines or [])
    backend = "tensorrt" if engines and args.backend == "auto" else args.backend
    if args.requests is not None and args.requests < 0:
        from trt_latency.errors import ConfigError

        raise ConfigError(field="--requests", expected="an integer >= 0", got=args.requests)
    if getattr(args, "vision_onnx", None) and address is not None:
        from trt_latency.errors import ConfigError

        raise ConfigError("the VLM chain's encoder files are not shipped to other nodes", field="--vision-onnx",
                          expected="--ray without ADDRESS (a local Ray) or calibrate without --ray",
                          got=f"--ray {address}")
    if getattr(args, "vision_onnx", None):  # a vision model the adapters cannot feed fails now, as locally
        from trt_latency.pipeline_vision import vision_signature

        vision_signature(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    say(f"trt-latency calibrate --ray: output {args.out}/")
    cals = _calibrations(args, models, engines, say)
    we_started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is not None:
            kwargs["address"] = address
        ray.init(**kwargs)
        we_started = True
    actors: list[Any] = []
    try:
        results = _run(ray, cals, backend, args, say, started, max_actors, actors)
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - an actor already gone needs no killing
                pass
        if we_started:
            ray.shutdown()
    say(f"  wall time    {time.perf_counter() - started:.1f} s")
    return results


def _run(ray: Any, cals: list[Calibration], backend: str, args: Any, say: Callable[[str], None],
         started: float, max_actors: int | None, actors: list[Any]) -> list[ClusterResult]:
    from trt_latency.budget import target_end
    from trt_latency.pipeline import measure_plans, time_budget

    plan0 = cals[0].plan
    threads = max(int(plan0.runtime.intra_op_threads or 1), 1)
    n_actors, resources, pin = _actor_kind(ray, backend, threads, max_actors)
    items: list[Item] = []
    shipped: dict[str, Any] = {}
    for ci, cal in enumerate(cals):
        # The local run's own per-config phases (batch sweep and encoder sweep on the primary, the replay
        # under each config's request_id range): pipeline.measure_plans decides for both.
        works = measure_plans(cal.options, cal.plan, cal.targets, backend)
        for pi, (t, work) in enumerate(zip(cal.targets, works, strict=True)):
            if str(t.path) not in shipped:  # actors on nodes without this path fetch it from the object store
                shipped[str(t.path)] = ray.put(_model_files(Path(t.path)))
            items.append(Item(index=len(items), calibration=ci, position=pi, key=t.key, tier=t.tier,
                              path=str(Path(t.path).resolve()), files=shipped[str(t.path)],
                              work=replace(work, progress=False)))
    n_actors = min(n_actors, len(items))
    run_id = uuid.uuid4().hex[:8]
    remote = ray.remote(Worker)
    for i in range(n_actors):
        actors.append(remote.options(name=f"{ACTOR_PREFIX}-{run_id}-{i}", max_restarts=MAX_RESTARTS,
                                     max_task_retries=0, **resources).remote(i, threads, pin))
    kind = ", ".join(f"{k}={v}" for k, v in resources.items())
    say(f"  {len(items)} work item(s) (model, config) on {n_actors} Ray actor(s) ({kind} each"
        f"{', pinned to cores' if pin else ''}), backend {backend}")
    budget = time_budget(plan0)
    folders: dict[tuple[int, str], _Folder] = {}
    done: dict[int, dict[str, Any]] = {}
    resent: dict[int, int] = {}
    pinned: dict[int, list[int]] = {}  # actor -> the cores it pinned itself to (CPU actors)
    pending = list(items)
    running: dict[Any, tuple[int, Item]] = {}  # generator -> (actor index, item)
    bars = _Bars(n_actors, len(items), args)

    def dispatch(a: int) -> None:
        if not pending:
            return
        item = pending.pop(0)
        _done_for(item, cals[item.calibration].root)
        # The item's window: an equal share of what the budget leaves, per round of items over the actors
        # (the local run's arithmetic, trt_latency/budget.target_end, with actors side by side).
        end = target_end(started, budget, math.ceil((len(pending) + 1) / n_actors))
        if end is not None:
            item.deadline_wall = time.time() + (end - time.perf_counter())
        gen = actors[a].run.options(num_returns="streaming").remote(item)
        running[gen] = (a, item)

    try:
        for a in range(n_actors):
            dispatch(a)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for gen in ready:
                a, item = running[gen]
                try:
                    chunk = ray.get(next(gen))
                except StopIteration:
                    del running[gen]
                    bars.item_done()
                    dispatch(a)
                    continue
                except ray.exceptions.RayActorError as exc:  # the actor died: Ray restarts it, we resend
                    del running[gen]
                    resent[item.index] = resent.get(item.index, 0) + 1
                    if resent[item.index] > MAX_RESTARTS:
                        raise TrtLatencyError(f"work item {_name(item)} failed {resent[item.index]} times: "
                                              f"{exc}") from None
                    say(f"  actor {a} died during {_name(item)} ({type(exc).__name__}): item resent, it "
                        "continues from the rows on disk")
                    pending.insert(0, item)
                    dispatch(a)
                    continue
                root = cals[item.calibration].root
                for kind_, data in chunk:
                    if kind_ == "hello" and a not in pinned:
                        pinned[a] = data["pinned"]
                    elif kind_ == "samples":
                        f = _folder(folders, item.calibration, root, data[10])
                        f.add_samples([data])
                        bars.rows(a, data[10], 1)
                    elif kind_ == "requests":
                        for row in data:
                            _folder(folders, item.calibration, root, str(row["device"])).add_requests([row])
                    elif kind_ == "state":
                        name, key, positions = data
                        _folder(folders, item.calibration, root, name).samples.write_state(key, positions)
                    elif kind_ == "vision":  # the encoder sweep's file, redone whole as on one machine
                        name, data_ = data
                        (_folder(folders, item.calibration, root, name).path / "vision_samples.csv").write_bytes(data_)
                    elif kind_ == "result":
                        done[item.index] = data
                        _folder(folders, item.calibration, root, data["device"])
    except KeyboardInterrupt:
        say("  interrupted: the rows measured so far are in the device folders; rerun to continue")
        raise
    finally:
        for f in folders.values():
            f.close()
        bars.close()
    retried = len(resent)
    if any(pinned.values()):
        say("  cores: " + ", ".join(f"actor {a} on {c}" for a, c in sorted(pinned.items())))
    say(f"  {len(done)} of {len(items)} item(s) measured" + (f", {retried} resent after an actor restart"
                                                              if retried else "")
        + f"; rows dropped as already written: {sum(f.dropped for f in folders.values())}")
    results = _fit_all(cals, items, done, folders, say)
    from trt_latency.budget import Ledger
    from trt_latency.pipeline import larger_budget_lines
    from trt_latency.report import time_lines

    ledger = Ledger()
    for d in done.values():
        ledger.merge(d["measured"].ledger)
    say("")
    say(f"(seconds per phase summed over {n_actors} actor(s), side by side)")
    for line in time_lines(budget, time.perf_counter() - started, ledger.seconds, ledger.overruns,
                           larger_budget_lines([d["measured"] for _, d in sorted(done.items())], plan0)):
        say(line)
    return results


def _name(item: Item) -> str:
    t, k, b = (int(x) for x in item.key)
    return f"t{t}.k{k}.b{b} of {Path(item.path).name}"


def _folder(folders: dict[tuple[int, str], _Folder], ci: int, root: Path, device: str) -> _Folder:
    name = device_folder(device)
    f = folders.get((ci, name))
    if f is None:
        f = folders[(ci, name)] = _Folder(root / name)
    return f


class _Bars:
    """One bar per actor (rows of its device) and a total (items), on a terminal only."""

    def __init__(self, n_actors: int, n_items: int, args: Any) -> None:
        self.bars: list[Any] = []
        self.devices: list[str] = [""] * n_actors
        self.total: Any = None
        if args.no_progress:
            return
        from tqdm import tqdm

        self.total = tqdm(total=n_items, desc="all items", unit="item", position=0, leave=False, disable=None,
                          dynamic_ncols=True)
        self.bars = [tqdm(desc=f"actor {i}", unit="row", position=i + 1, leave=False, disable=None,
                          dynamic_ncols=True) for i in range(n_actors)]

    def rows(self, actor: int, device: str, n: int) -> None:
        if self.bars:
            bar = self.bars[actor]
            if self.devices[actor] != device:
                self.devices[actor] = device
                bar.set_description(f"actor {actor} ({device[:32]})", refresh=False)
            bar.update(n)

    def item_done(self) -> None:
        if self.total is not None:
            self.total.update(1)

    def close(self) -> None:
        for bar in [*self.bars, self.total]:
            if bar is not None:
                bar.close()


def _fit_all(cals: list[Calibration], items: list[Item], done: dict[int, dict[str, Any]],
             folders: dict[tuple[int, str], _Folder], say: Callable[[str], None]) -> list[ClusterResult]:
    """Per calibration and device folder: the single-machine pipeline's own ``finish`` (fit, provenance,
    vision section, plots, loop terms, conformal factors) over the measured items of that folder."""
    from trt_latency.pipeline import finish, load, position_table

    results = []
    for (ci, name), folder in sorted(folders.items()):
        cal_def = cals[ci]
        out = folder.path
        mine = [d["measured"] for i, d in sorted(done.items())
                if items[i].calibration == ci and d["folder"] == name]
        measured = {tuple(m.key) for m in mine}
        targets = [replace(t, path=_place_model(t.path, out)) for t in cal_def.targets if tuple(t.key) in measured]
        if not targets or not (out / "samples.csv").is_file():
            continue
        info = mine[0].runner if mine else {}
        # Ray actors replay through our ORT loop (engines.replay), never genai's: provenance says so.
        fin = finish(out, cal_def.plan, targets, mine, replace(cal_def.options, runtime="ort"))
        say("")
        say(f"{out}: {info.get('backend', '?')} on {info.get('device', '?')}, {len(targets)} config(s), "
            f"{len(fin.samples)} timed repetitions")
        say(position_table(fin.samples, load(fin.calibration)))
        for line in fin.loop_lines + fin.vision_lines:
            say(line)
        requests = out / "requests.csv"
        results.append(ClusterResult(out=out, device=str(info.get("device", name)), calibration=fin.calibration,
                                     samples=out / "samples.csv", requests=requests if requests.is_file() else None,
                                     rows=len(fin.samples)))
    return results


def _place_model(path: Path, out: Path) -> Path:
    """The model beside the device folder's calibration.yaml (hard link, else copy), as a single-machine
    run leaves it: loadtest looks for model.onnx there. A user's model outside DIR stays where it is."""
    import shutil

    path = Path(path)
    if path.parent.resolve() != out.parent.resolve():
        return path
    dest = out / path.name
    if not dest.exists():
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)
    return dest
