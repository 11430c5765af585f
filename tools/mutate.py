"""Mutation check: plant each known bug, run the tests that should catch it, restore, report a table.

Each mutation is hand-written (file, exact old text, new text, tests), so no extra dependency is
needed; the old text must occur exactly once. A mutation of a .pyx / .pxd rebuilds the extension
(`python setup.py build_ext --inplace`, Cython must be installed in the environment); the original
sources are put back in a `finally` (also on Ctrl-C) and the extension is rebuilt from them.

    python tools/mutate.py            # all mutations, a markdown table on stdout
    python tools/mutate.py -k fixup   # those whose name contains "fixup"

Exit status 0 when every planted bug is caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    patches: tuple[tuple[str, str, str], ...]  # (file, exact old text, new text)
    tests: tuple[str, ...]

    @property
    def compiled(self) -> bool:
        return any(f.endswith((".pyx", ".pxd")) for f, _, _ in self.patches)


KO = "tests/test_kernel_oracles.py"
MUTATIONS = [
    Mutation("decode-sum closed form (reference cumsum)",
             (("estimator/_reference.py", "p[P_SLOPE] * (k * (k - 1.0) * 0.5)", "p[P_SLOPE] * (k * (k + 1.0) * 0.5)"),),
             ("tests/test_estimator_kernels.py::test_closed_form_sum_matches_loop",)),
    Mutation("conformal rank (n instead of n + 1)",
             (("serving/conformal.py", "math.ceil((n + 1) * (1.0 - alpha) - 1e-9)", "math.ceil(n * (1.0 - alpha) - 1e-9)"),),
             ("tests/test_serving_conformal.py",)),
    Mutation("swapped past key / value in the exported graph",
             (("engines/export.py", 'g.op("Concat", [f"past_key_values.{b}.key", k]',
               'g.op("Concat", [f"past_key_values.{b}.value", k]'),
              ("engines/export.py", 'g.op("Concat", [f"past_key_values.{b}.value", v]',
               'g.op("Concat", [f"past_key_values.{b}.key", v]')),
             ("tests/test_engines_export.py",)),
    Mutation("one-SE rule dropped (fewest knots within 1 SE -> the minimum)",
             (("estimator/fit.py", "chosen = min(k for k in scores if scores[k] <= scores[best] + ses[best])",
               "chosen = best"),),
             ("tests/test_fit_knots.py",)),
    Mutation("greedy_knots candidate range shrunk at the top",
             (("estimator/fit.py", "for j in range(1, n - 1):", "for j in range(1, n - 2):"),),
             ("tests/test_fit_knots.py",)),
    Mutation("greedy_knots candidate range shrunk at the bottom",
             (("estimator/fit.py", "for j in range(1, n - 1):", "for j in range(2, n - 1):"),),
             ("tests/test_fit_knots.py",)),
    Mutation("reference fix-up bisection: <= turned <",
             (("estimator/_reference.py", "            if fits(mid):\n",
               "            if self._total_at(c, prompt, float(mid), factor, pre, cp, ds) < budget:\n"),),
             (KO,)),
    Mutation("reference fix-up cap: TOKEN_MAX - 1",
             (("estimator/_reference.py", "                if lo >= TOKEN_MAX:\n                    return TOKEN_MAX",
               "                if lo >= TOKEN_MAX:\n                    return TOKEN_MAX - 1"),),
             (KO,)),
    Mutation("reference nfit: overflow cap dropped",
             (("estimator/_reference.py", "            k = 1e18\n", "            k = k\n"),),
             (KO,)),
    Mutation("reference conformal factor: stored alpha <= turned <",
             (("estimator/_reference.py", "if self.conf[off + j][0] <= alpha:", "if self.conf[off + j][0] < alpha:"),),
             (KO,)),
    Mutation("AdmissionController.reset keeps the compiled gates",
             (("serving/admission.py", "            self._gates.clear()\n", ""),),
             ("tests/test_serving_reset_probe.py",)),
    Mutation("loadtest oracle judged on the prediction, not the true total",
             (("serving/loadgen.py", "return self.total_ms <= self.budget_ms", "return self.predicted_ms <= self.budget_ms"),),
             ("tests/test_serving_loadtest.py::test_loadtest_json_structure_and_sanity",)),
    Mutation("Estimator.max_new_tokens one short (README block)",
             (("estimator/model.py", "return int(self._kernel.nfit(row, float(prompt), budget, factor))",
               "return max(0, int(self._kernel.nfit(row, float(prompt), budget, factor)) - 1)"),),
             ("tests/test_readme.py",)),
    # compiled code last: one rebuild per mutation, one at the end from the restored sources
    Mutation("extrapolation boundary P+n-2 -> P+n-1 (both implementations)",
             (("estimator/_reference.py", "prompt + n - 2.0 > row[PAST_HI]", "prompt + n - 1.0 > row[PAST_HI]"),
              ("ext/_kernels.pxd", "prompt + n - 2.0 > row[PAST_HI]", "prompt + n - 1.0 > row[PAST_HI]")),
             (KO,)),
    Mutation("Cython fix-up bisection: <= turned <",
             (("ext/_kernels.pxd", "c_total_at(t, c, prompt, <double>mid, factor, pre, cp, hint, ds) <= budget",
               "c_total_at(t, c, prompt, <double>mid, factor, pre, cp, hint, ds) < budget"),),
             (KO,)),
    Mutation("Cython decode-sum closed form (c_cumsum)",
             (("ext/_kernels.pxd",
               "cdef double k = m - p[P_START]\n    return p[P_CUM] + k * p[P_VALUE] + p[P_SLOPE] * (k * (k - 1.0) * 0.5)",
               "cdef double k = m - p[P_START]\n    return p[P_CUM] + k * p[P_VALUE] + p[P_SLOPE] * (k * (k + 1.0) * 0.5)"),),
             ("tests/test_estimator_kernels.py::test_closed_form_sum_matches_loop",)),
    Mutation("Cython admit_batch: max_new_tokens 0 accepted",
             (("ext/_kernels.pyx", "elif not (req == -1 or 1 <= req <= TOKEN_MAX):",
               "elif not (req == -1 or 0 <= req <= TOKEN_MAX):"),),
             (KO,)),
    Mutation("Gate probe one rejection late (>= turned >)",
             (("serving/_gate.pyx", "self.tally.streak >= self.probe_after", "self.tally.streak > self.probe_after"),),
             ("tests/test_serving_reset_probe.py",)),
    Mutation("drift correction: the level never divided out",
             (("trt_latency/stats.py", "        adjusted = v * np.exp(-level)", "        adjusted = v"),),
             ("tests/test_estimator_fit.py", "tests/test_engines_adaptive.py")),
    Mutation("drift correction: the running window a third of a round",
             (("trt_latency/stats.py", "    half = window // 2\n", "    half = max(window // 6, 1)\n"),),
             ("tests/test_estimator_fit.py", "tests/test_engines_adaptive.py")),
    Mutation("serpentine walk never reversed",
             (("engines/sweep.py", "    if round_no % 2:\n        decode.reverse()", "    if False:\n        decode.reverse()"),),
             ("tests/test_engines_sweep.py",)),
    Mutation("time to target ignores the warm-up runs",
             (("engines/adaptive.py", "        runs = 1 + (plan_warmup if st.warmup is None else st.warmup)",
               "        runs = 1"),),
             ("tests/test_engines_adaptive.py",)),
    Mutation("serving loop: the raw prefill without the encoder (the 14x VLM correction)",
             (("serving/admission.py", "        if vision > 0:\n            pre += self._kernel.vision(",
               "        if False:\n            pre += self._kernel.vision("),),
             ("tests/test_serving_images.py",)),
    Mutation("gate: a request's images ignored (priced as one image)",
             (("serving/_gate.pyx", "self.ps[bucket], self.ds[bucket], <double>f[0], <double>images)",
               "self.ps[bucket], self.ds[bucket], <double>f[0], 1.0)"),),
             ("tests/test_serving_gate.py", "tests/test_serving_images.py")),
    Mutation("admit_batch: the images array ignored",
             (("ext/_kernels.pyx", "                im = images[i] if per_images else 1\n                if not (0.0 <= b < INFINITY):",
               "                im = 1\n                if not (0.0 <= b < INFINITY):"),),
             ("tests/test_estimator_kernels.py",)),
    Mutation("loadtest: a VLM request's encoder time left out of its TTFT",
             (("serving/loadgen.py", "        before = timing.before_prefill_ms\n    else:",
               "        before = 0.0\n    else:"),),
             ("tests/test_vlm.py",)),
]


def build() -> None:
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build_ext failed:\n{proc.stderr[-3000:]}")


def run_tests(tests: tuple[str, ...]) -> tuple[int, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "--hypothesis-profile=mutate", *tests], cwd=ROOT,
                          capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - start


def apply(m: Mutation, originals: dict[Path, str]) -> None:
    """Patch the files, recording each file's original text in `originals` before its first change."""
    for name, old, new in m.patches:
        path = ROOT / name
        current = path.read_text(encoding="utf-8")
        originals.setdefault(path, current)
        if current.count(old) != 1:
            raise ValueError(f"{m.name}: the old text occurs {current.count(old)} times in {name}")
        path.write_text(current.replace(old, new), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only mutations whose name contains this")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    rows: list[tuple[str, str, str, float]] = []
    stale = False  # the built extension comes from mutated sources
    try:
        for m in chosen:
            if stale and not m.compiled:
                build()
                stale = False
            originals: dict[Path, str] = {}
            try:
                apply(m, originals)
                if m.compiled:
                    stale = True
                    build()
                rc, secs = run_tests(m.tests)
                verdict = "caught" if rc == 1 else "MISSED" if rc == 0 else f"error (pytest rc {rc})"
            except (RuntimeError, ValueError) as exc:
                verdict, secs = f"error: {str(exc).splitlines()[0]}", 0.0
            finally:
                for path, text in originals.items():
                    path.write_text(text, encoding="utf-8")
            rows.append((m.name, verdict, " ".join(t.replace("tests/", "") for t in m.tests), secs))
            print(f"{verdict:8s} {m.name}", file=sys.stderr, flush=True)
    finally:
        if stale:
            build()
    print("| planted bug | result | tests run | s |")
    print("|---|---|---|---|")
    for name, verdict, tests, secs in rows:
        print(f"| {name} | {verdict} | {tests} | {secs:.1f} |")
    missed = sum(r[1] != "caught" for r in rows)
    print(f"\n{len(rows) - missed}/{len(rows)} caught")
    return 0 if missed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
