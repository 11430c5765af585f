"""Fidelity of the project's per-position step timing on third-party exports (benchmark only, never in CI).

For each fixture under tests/data/thirdparty/ and each KV position, three measurements side by side,
interleaved round by round in one run (so machine load hits them alike):

- independent: a plain onnxruntime loop written here (no trt_latency import) that binds the way the
  model's own runtime does. concat (optimum, torch): past [1, kv, L, d] in, present [1, kv, L+1, d]
  out to a second preallocated buffer. shared (onnxruntime-genai's past_present_share_buffer): past
  and present bound to the SAME preallocated [1, kv, max_length, d] buffer per layer, attention_mask
  of length L+1, the new token written in place. IOBinding, buffers allocated once.
- project: trt_latency's OrtRunner (what `trt-latency sweep --onnx F --kv-mode MODE` times),
  ``time_step(L, 1, reps)``.
- genai (genai fixtures with token ids, shared mode): onnxruntime-genai's own
  ``Generator.generate_next_token()`` in a worker process of a venv that has onnxruntime-genai
  (``--genai-python``; it brings its own onnxruntime). Getting to position L: ``append_tokens`` of an
  L-token prompt once; then per repetition ``rewind_to(L-1)``, ``append_tokens([t])`` (runs the step
  at L-1), one untimed ``generate_next_token()`` (samples the pending logits, no model run), and the
  timed ``generate_next_token()``: one model run with L tokens of KV plus greedy selection. Column
  genai_select_ms is the untimed-in-genai_ms selection-only call: genai's own per-token overhead outside
  the model run (on this tiny model it is a visible part of a 25 us step).

With ``--sweep-cli DIR`` it also runs ``trt-latency sweep --onnx F --kv-mode MODE --quick`` per fixture
as a user would (one warm-up + one timed step per visit, prefills shuffled in, a row fsync'ed per step)
and compares its medians with the independent loop run just before and after it (cli/indep_around).

Every visit first runs one untimed warm-up step at its shape. One intra-op and one inter-op thread
everywhere. Medians over rounds x reps. Run:

    python benchmarks/fidelity_thirdparty.py --genai-python /work/scratch/fixtures/venv-genai/bin/python

and, for the shared-vs-concat effect on one genai model at long KV:

    python benchmarks/fidelity_thirdparty.py --fixtures genai-llama-fp32 --modes shared,concat --positions 4096
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "thirdparty"
# Decoders the tool can time (the paged build and the T5 decoder are negative fixtures).
DEFAULT_FIXTURES = ("genai-llama-fp32", "genai-llama-int4", "genai-llama-embeds", "genai-qwen2-fp32",
                    "genai-phi3-fp32", "optimum-llama-fp32", "optimum-llama-fp16", "torch-llama-embeds",
                    "torch-llama-embeds-dynamo")

# onnxruntime-genai re-runs the whole sequence each time a model of type "phi3" crosses 4096 tokens (a
# special case for that type in its runtime: ~0.5 s on this 8192-context fixture, whose config has no rope
# scaling), so the rewind-based genai timing at 4096 would time a re-prefill: genai column off by default.
GENAI_SKIP = ("genai-phi3-fp32",)

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32}


# -- independent plain-onnxruntime loop ---------------------------------------------------------------


@dataclass
class ModelFacts:
    """What a runtime reads from the files beside the model (genai_config.json or config.json)."""

    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    max_length: int
    share_buffer: bool
    genai: bool


def model_facts(model_dir: Path) -> ModelFacts:
    genai = model_dir / "genai_config.json"
    if genai.is_file():
        g = json.loads(genai.read_text())
        dec = g["model"]["decoder"]
        return ModelFacts(dec["num_key_value_heads"], dec["head_size"], dec["hidden_size"], g["model"]["vocab_size"],
                          g["search"]["max_length"], bool(g["search"].get("past_present_share_buffer")), True)
    c = json.loads((model_dir / "config.json").read_text())
    heads = c["num_attention_heads"]
    return ModelFacts(c.get("num_key_value_heads", heads), c.get("head_dim") or c["hidden_size"] // heads,
                      c["hidden_size"], c["vocab_size"], c["max_position_embeddings"], False, False)


class IndependentLoop:
    """One decode step at past length L, bound the way the model's runtime binds it (see module doc)."""

    def __init__(self, path: Path, mode: str, max_pos: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.facts = f = model_facts(path.parent)
        self.mode = mode
        inputs = {i.name: i for i in self.sess.get_inputs()}
        self.kv_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.kv_dtype = _NP[inputs[self.kv_names[0]].type]
        rng = np.random.default_rng(0)
        # shared: genai's buffer is search.max_length long; concat: room for past + 1
        self.max_len = f.max_length if mode == "shared" else max_pos + 1
        shape = (1, f.kv_heads, self.max_len, f.head_dim)
        sets = 1 if mode == "shared" else 2
        self.kv = [{n: (rng.standard_normal(shape) * 0.1).astype(self.kv_dtype) for n in self.kv_names}
                   for _ in range(sets)]
        self.token_name = "inputs_embeds" if "inputs_embeds" in inputs else "input_ids"
        tok_type = _NP[inputs[self.token_name].type]
        self.tokens = (rng.standard_normal((1, 1, f.hidden)).astype(tok_type) if self.token_name == "inputs_embeds"
                       else np.array([[5]], dtype=tok_type))
        self.mask_name = "attention_mask" if "attention_mask" in inputs else None
        self.mask = np.ones((1, self.max_len + 1), dtype=_NP[inputs["attention_mask"].type]) if self.mask_name else None
        self.pos = np.zeros((1, 1), dtype=np.int64) if "position_ids" in inputs else None
        out_type = next(o.type for o in self.sess.get_outputs() if o.name == "logits")
        self.logits = np.empty((1, 1, f.vocab), dtype=_NP[out_type])

    def bind(self, past: int) -> Any:
        f, b = self.facts, self.sess.io_binding()
        b.bind_cpu_input(self.token_name, self.tokens)
        if self.mask_name is not None and self.mask is not None:
            b.bind_input(self.mask_name, "cpu", 0, self.mask.dtype, [1, past + 1], self.mask.ctypes.data)
        if self.pos is not None:
            self.pos[0, 0] = past
            b.bind_cpu_input("position_ids", self.pos)
        b.bind_output("logits", "cpu", 0, self.logits.dtype, list(self.logits.shape), self.logits.ctypes.data)
        for n in self.kv_names:
            present = n.replace("past_key_values", "present")
            if self.mode == "shared":  # one buffer, bound as both; GQA writes the token at slot `past`
                buf = self.kv[0][n]
                b.bind_input(n, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
                b.bind_output(present, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            else:  # contiguous prefixes of flat buffers: [1, kv, past, d] in, [1, kv, past+1, d] out
                src, dst = self.kv[0][n], self.kv[1][n]
                b.bind_input(n, "cpu", 0, src.dtype, [1, f.kv_heads, past, f.head_dim], src.ctypes.data)
                b.bind_output(present, "cpu", 0, dst.dtype, [1, f.kv_heads, past + 1, f.head_dim], dst.ctypes.data)
        return b

    def time(self, past: int, reps: int) -> np.ndarray:
        b = self.bind(past)
        run = self.sess.run_with_iobinding
        run(b)  # warm-up at this shape
        out = np.empty(reps)
        clock = time.perf_counter_ns
        for r in range(reps):
            t0 = clock()
            run(b)
            out[r] = (clock() - t0) * 1e-6
        return out

    def close(self) -> None:
        del self.sess


# -- onnxruntime-genai's own loop, in its own venv ----------------------------------------------------

GENAI_WORKER = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
cfg = og.Config(sys.argv[1])
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1,
                                                                  "inter_op_num_threads": 1}}}}))
model = og.Model(cfg)
gens = {}
rng = np.random.default_rng(0)
print(json.dumps({"ready": og.__version__}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    L, reps = req["L"], req["reps"]
    if L not in gens:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=int(req["max_length"]))
        g = og.Generator(model, params)
        g.append_tokens(rng.integers(4, int(req["vocab"]), L).astype(np.int32))
        gens[L] = g
    g = gens[L]
    out, sel = [], []
    for r in range(reps + 1):  # the first is a warm-up at this position
        g.rewind_to(L - 1)
        g.append_tokens(np.array([5], dtype=np.int32))  # step at L-1; logits pending
        t0 = time.perf_counter_ns()
        g.generate_next_token()  # selects from the pending logits (no model run); count L+1
        t1 = time.perf_counter_ns()
        g.generate_next_token()  # one model run with L tokens of KV + greedy selection
        out.append((time.perf_counter_ns() - t1) * 1e-6)
        sel.append((t1 - t0) * 1e-6)
    print(json.dumps({"ms": out[1:], "select_ms": sel[1:]}), flush=True)
"""


class GenaiLoop:
    """onnxruntime-genai's generate_next_token timed in a worker process (see module doc)."""

    def __init__(self, python: str, model_dir: Path, facts: ModelFacts) -> None:
        self.facts = facts
        self.proc = subprocess.Popen([python, "-c", GENAI_WORKER, str(model_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.version = json.loads(self.proc.stdout.readline())["ready"]
        self.last_select = np.empty(0)

    def time(self, past: int, reps: int) -> np.ndarray:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        req = {"L": past, "reps": reps, "max_length": self.facts.max_length, "vocab": self.facts.vocab}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        self.last_select = np.asarray(reply["select_ms"])
        return np.asarray(reply["ms"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


# -- the project's own measurement ----------------------------------------------------------------------


class ProjectLoop:
    """trt_latency's OrtRunner: the same time_step the sweep and calibrate verbs call."""

    def __init__(self, path: Path, mode: str, max_pos: int) -> None:
        from trt_latency.engines.ort.runner import OrtRunner

        self.runner = OrtRunner(path, "cpu", intra_op_threads=1, inter_op_threads=1, kv_mode=mode,
                                max_past_len=max_pos, max_new_tokens=16)

    def time(self, past: int, reps: int) -> np.ndarray:
        # warm-up and timed runs in one bound call, as the sweep's measure_once does
        return np.asarray(self.runner.time_step(past, 1, reps + 1))[1:]

    def close(self) -> None:
        self.runner.close()


def sweep_cli_medians(name: str, mode: str, positions: list[int], out_dir: Path) -> dict[int, float]:
    """`trt-latency sweep --onnx F --kv-mode MODE --quick` as a user runs it (after the interleaved
    rounds, in its own process): decode medians at ``positions`` from its samples.csv (the quick grid
    holds 16, 1024 and 4096 when --max-past-len is 4096)."""
    import csv

    samples = out_dir / f"{name}-{mode}.csv"
    samples.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "trt_latency", "sweep", "--onnx", str(FIXTURES / name / "model.onnx"),
           "--kv-mode", mode, "--max-past-len", str(max(positions)), "--backend", "ort-cpu", "--threads", "1",
           "--quick", "--no-progress", "--out", str(samples)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    by_pos: dict[int, list[float]] = {}
    with open(samples, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(line for line in fh if not line.startswith("#")):
            if row["phase"] == "decode" and int(row["past_len"]) in positions:
                by_pos.setdefault(int(row["past_len"]), []).append(float(row["latency_ms"]))
    return {p: float(np.median(v)) for p, v in by_pos.items()}


VISIT_KINDS = ("burst", "w1", "w1_after_fsync", "w1_after_prefill", "w1_after_prefill_fsync", "w3_after_prefill_fsync")


def visit_probe(name: str, mode: str, positions: list[int], rounds: int, rng: np.random.Generator,
                scratch: Path) -> dict[str, dict[int, float]]:
    """Why a sweep visit reads more than a back-to-back step: the project's runner timed as the sweep
    does (warm-up + one timed step per visit), after a visit elsewhere, optionally after a 256-token
    prefill and/or an fsync'ed write (the sweep appends and fsyncs a samples row per step), vs a burst
    of back-to-back steps (a runtime's decode loop). Kinds interleaved in shuffled order; medians."""
    from trt_latency.engines.ort.runner import OrtRunner

    runner = OrtRunner(FIXTURES / name / "model.onnx", "cpu", intra_op_threads=1, inter_op_threads=1,
                       kv_mode=mode, max_past_len=max(positions), max_new_tokens=256)
    res: dict[str, dict[int, list[float]]] = {k: {p: [] for p in positions} for k in VISIT_KINDS}
    with runner, open(scratch, "w", encoding="utf-8") as fh:
        for _ in range(rounds):
            for p in (int(v) for v in rng.permutation(positions)):
                for kind in (str(k) for k in rng.permutation(VISIT_KINDS)):
                    runner.time_step(int(rng.choice([q for q in positions if q != p])), 1, 2)
                    if "prefill" in kind:
                        runner.time_step(0, 256, 1)
                    if "fsync" in kind:
                        fh.write("row\n")
                        fh.flush()
                        os.fsync(fh.fileno())
                    if kind == "burst":
                        res[kind][p].extend(float(v) for v in runner.time_step(p, 1, 11)[1:])
                    else:
                        res[kind][p].append(float(runner.time_step(p, 1, 4 if kind.startswith("w3") else 2)[-1]))
    return {k: {p: float(np.median(v)) for p, v in by_pos.items()} for k, by_pos in res.items()}


# -- driver ---------------------------------------------------------------------------------------------


@dataclass
class Cell:
    fixture: str
    mode: str
    position: int
    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, who: str) -> float | None:
        s = self.samples.get(who)
        return float(np.median(s)) if s else None


def _runtime_mode(model_dir: Path) -> str:
    return "shared" if model_facts(model_dir).share_buffer else "concat"


def measure_fixture(name: str, modes: list[str], positions: list[int], rounds: int, reps: int,
                    genai_python: str | None, rng: np.random.Generator, genai_all: bool = False) -> list[Cell]:
    model_dir = FIXTURES / name
    path = model_dir / "model.onnx"
    facts = model_facts(model_dir)
    max_pos = max(positions)
    cells: list[Cell] = []
    loops: dict[tuple[str, str], Any] = {}
    try:
        for mode in modes:
            loops[(mode, "independent")] = IndependentLoop(path, mode, max_pos)
            loops[(mode, "project")] = ProjectLoop(path, mode, max_pos)
            ids = loops[(mode, "independent")].token_name == "input_ids"
            if mode == "shared" and facts.genai and genai_python and ids and (genai_all or name not in GENAI_SKIP):
                loops[(mode, "genai")] = GenaiLoop(genai_python, model_dir, facts)
            cells += [Cell(name, mode, p) for p in positions]
        for _ in range(rounds):
            order = list(rng.permutation(len(cells)))
            for idx in order:
                cell = cells[int(idx)]
                whos = [w for (m, w) in loops if m == cell.mode]
                for j in rng.permutation(len(whos)):
                    who = whos[int(j)]
                    loop = loops[(cell.mode, who)]
                    ms = loop.time(cell.position, reps)
                    cell.samples.setdefault(who, []).extend(float(v) for v in ms)
                    if who == "genai":  # genai's token selection alone (its own per-step overhead)
                        cell.samples.setdefault("genai_select", []).extend(float(v) for v in loop.last_select)
    finally:
        for loop in loops.values():
            loop.close()
    return cells


def _bracket(loop: IndependentLoop, positions: list[int], reps: int, rng: np.random.Generator,
             into: dict[int, list[float]]) -> None:
    """5 shuffled rounds of the independent loop (measured around the sweep CLI run)."""
    for _ in range(5):
        for p in rng.permutation(positions):
            into[int(p)].extend(float(v) for v in loop.time(int(p), reps))


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=",".join(DEFAULT_FIXTURES), help="comma-separated dirs under "
                    "tests/data/thirdparty (default: every timeable one)")
    ap.add_argument("--modes", default="runtime", help="runtime (the model's own: shared for genai, else concat), "
                    "or a comma list of concat,shared")
    ap.add_argument("--positions", default="16,1024,4096", help="past lengths (default 16,1024,4096)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    ap.add_argument("--reps", type=int, default=20, help="timed steps per visit (default 20)")
    ap.add_argument("--genai-python", default=os.environ.get("GENAI_PYTHON"),
                    help="python of a venv with onnxruntime-genai (default $GENAI_PYTHON; none: genai column '-')")
    ap.add_argument("--genai-all", action="store_true", help=f"genai column also for {', '.join(GENAI_SKIP)}")
    ap.add_argument("--sweep-cli", metavar="DIR", help="also run `trt-latency sweep --quick` per fixture and mode "
                    "(samples in DIR) and add its medians (column sweep_cli_ms; it runs after the interleaved "
                    "rounds, compared with the independent loop run just before and after it: cli/indep_around)")
    ap.add_argument("--visit-probe", action="store_true", help="instead: time the project's runner the way a "
                    "sweep visit does (warm-up count, prefill and fsync before it) vs back-to-back steps")
    ap.add_argument("--json", help="also write every cell's medians here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    positions = [int(p) for p in args.positions.split(",")]
    rng = np.random.default_rng(args.seed)
    load0 = os.getloadavg()
    t0 = time.time()
    if args.visit_probe:
        import tempfile

        print(f"# visit probe: onnxruntime {ort.__version__} CPU EP, 1 thread; {args.rounds} rounds; load average "
              f"{load0[0]:.1f}; median ms (x back-to-back burst)")
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.fixtures.split(","):
                mode = _runtime_mode(FIXTURES / name) if args.modes == "runtime" else args.modes.split(",")[0]
                med = visit_probe(name, mode, positions, args.rounds, rng, Path(tmp) / "rows.csv")
                print(f"{name} ({mode})")
                for kind, by_pos in med.items():
                    print(f"  {kind:24s}" + "  ".join(f"{p}: {by_pos[p]:.4f} ({by_pos[p] / med['burst'][p]:.2f}x)"
                                                      for p in positions))
        return 0
    cells: list[Cell] = []
    for name in args.fixtures.split(","):
        modes = [_runtime_mode(FIXTURES / name)] if args.modes == "runtime" else args.modes.split(",")
        cells += measure_fixture(name, modes, positions, args.rounds, args.reps, args.genai_python, rng,
                                 args.genai_all)
    if args.sweep_cli:
        # The CLI cannot interleave with the loops here: bracket it with the independent loop run just
        # before and just after (same positions, 5 rounds), and compare it with those.
        out_dir = Path(args.sweep_cli)
        out_dir.mkdir(parents=True, exist_ok=True)
        for fixture, mode in dict.fromkeys((c.fixture, c.mode) for c in cells):
            loop = IndependentLoop(FIXTURES / fixture / "model.onnx", mode, max(positions))
            around: dict[int, list[float]] = {p: [] for p in positions}
            _bracket(loop, positions, args.reps, rng, around)
            medians = sweep_cli_medians(fixture, mode, positions, out_dir)
            _bracket(loop, positions, args.reps, rng, around)
            loop.close()
            for c in cells:
                if (c.fixture, c.mode) == (fixture, mode) and c.position in medians:
                    c.samples["sweep_cli"] = [medians[c.position]]
                    c.samples["independent_around_cli"] = around[c.position]
    load1 = os.getloadavg()
    print(f"# onnxruntime {ort.__version__} CPU EP, 1 intra-op thread; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; load average {load0[0]:.1f} -> {load1[0]:.1f} (busy machine when > 1); "
          f"{args.rounds} rounds x {args.reps} reps per cell, interleaved; {time.time() - t0:.0f} s")
    header = ("fixture", "mode", "position", "independent_ms", "project_ms", "project/indep", "genai_ms",
              "project/genai", "genai_select_ms", "sweep_cli_ms", "cli/indep_around")
    rows = []
    for c in cells:
        ind, proj, gen = c.median("independent"), c.median("project"), c.median("genai")
        rows.append((c.fixture, c.mode, str(c.position), _fmt(ind), _fmt(proj),
                     _fmt(proj / ind if ind and proj else None, 3), _fmt(gen),
                     _fmt(proj / gen if gen and proj else None, 3), _fmt(c.median("genai_select")),
                     _fmt(c.median("sweep_cli")),
                     _fmt(cli / ia if (cli := c.median("sweep_cli")) and (ia := c.median("independent_around_cli"))
                          else None, 3)))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    if args.json:
        Path(args.json).write_text(json.dumps([{"fixture": c.fixture, "mode": c.mode, "position": c.position,
                                                **{k: c.median(k) for k in c.samples}} for c in cells], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
