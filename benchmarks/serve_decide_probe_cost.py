"""The compiled decision's cost with the probe check (issue 25), against a baseline build, side by side.

    python benchmarks/serve_decide_probe_cost.py [--baseline-so OLD/serving/_batch...so] [--running 64]

BatchState.decide now records the factor it used and, on a reject into an empty batch, checks whether a
probe is due (batch_reference.probe_due). This times three calls on the synthetic batch section of the tests
(tests/test_serving_batch.synthetic_section's shape): an admit with ``running`` requests in the batch, a
reject with the same batch (the probe check's ``m == 0`` fails at once), and a reject into an empty batch
whose probe is not due (the check runs in full, no second kernel call). With ``--baseline-so`` (a build of
serving/_batch.pyx from an older commit, e.g. ``git archive b946024 | tar -x -C /tmp/old && cd /tmp/old &&
python setup.py build_ext --inplace``) the same calls on that build, interleaved round by round. Median ns
per call; timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import timeit
from typing import Any

import numpy as np

SECTION_SIZES = (1, 2, 4, 8)
PREFILL = (1.5, 0.01, 1e-6)


def _section() -> dict[str, Any]:
    curves = []
    for b in SECTION_SIZES:
        xs = [0.0, 256.0 * b, 1024.0 * b, 4096.0 * b]
        vs = [2.0 + 0.05 * b + 0.0006 * x for x in xs]
        curves.append({"batch": b, "knots_x": xs, "values_ms": vs})
    return {"kv_read": "padded", "prefill_with_batch": "separate", "sizes": list(SECTION_SIZES), "curves": curves,
            "valid_x": [1.0, 4096.0 * SECTION_SIZES[-1]]}


def _load(path: str) -> Any:
    """The baseline's compiled module, under its own name (it imports the current batch_reference)."""
    spec = importlib.util.spec_from_file_location("trt_latency.serving._batch", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("trt_latency.serving._batch")
    spec.loader.exec_module(mod)
    if saved is not None:
        sys.modules["trt_latency.serving._batch"] = saved
    return mod


def _calls(mod: Any, running: int) -> dict[str, Any]:
    from trt_latency.serving import batch_reference as ref

    tables = ref.build_batch_tables(_section(), PREFILL)

    def clock() -> float:
        return 0.0

    full = mod.BatchState(mod.BatchKernel(tables), running + 1, True, 2.0, clock)
    rng = np.random.default_rng(1)
    for i in range(running):
        full.started(i, float(rng.integers(16, 2000)), float(rng.integers(2, 128)), float(rng.uniform(1e6, 1e7)))
    empty = mod.BatchState(mod.BatchKernel(tables), running + 1, True, 2.0, clock)
    if hasattr(empty, "last_admit"):  # probes on, an admission just now: the check runs, the probe is not due
        empty.probe_interval, empty.last_admit = 1000.0, 0.0
    admit = full.decide(-1, 100, 8, 1e9, 0.0)
    reject = full.decide(-2, 100, 8, 1.0, 0.0)
    alone = empty.decide(-3, 100, 8, 20.0, 0.0)
    assert admit.admit and not reject.admit and not alone.admit, (admit, reject, alone)
    return {"admit, batch": lambda: full.decide(-1, 100, 8, 1e9, 0.0),
            "reject, batch": lambda: full.decide(-2, 100, 8, 1.0, 0.0),
            "reject, empty": lambda: empty.decide(-3, 100, 8, 20.0, 0.0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-so", default=None)
    p.add_argument("--running", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--number", type=int, default=20000)
    args = p.parse_args(argv)
    from trt_latency.serving import _batch as current

    builds = {"current": _calls(current, args.running)}
    if args.baseline_so:
        builds["baseline"] = _calls(_load(args.baseline_so), args.running)
    ns: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for build, calls in builds.items():
            for name, fn in calls.items():
                ns.setdefault((build, name), []).append(timeit.timeit(fn, number=args.number) / args.number * 1e9)
    names = list(builds["current"])
    print(f"median ns per BatchState.decide ({args.rounds} rounds x {args.number}; {args.running} running)")
    print(f"{'call':<16}" + "".join(f"{b:>12}" for b in builds))
    for name in names:
        print(f"{name:<16}" + "".join(f"{statistics.median(ns[(b, name)]):>12.1f}" for b in builds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
