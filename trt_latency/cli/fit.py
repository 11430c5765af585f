"""`trt-latency fit`: samples.csv (and/or trtexec --exportTimes files) -> calibration.yaml."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from trt_latency.errors import InputError, SamplesError

EXAMPLE = """\
examples:
  trt-latency fit runs/samples.csv -o runs/calibration.yaml
  trt-latency fit --trtexec-times decode_L*.json prefill_S*.json -o trt.yaml --engine model.plan
  trt-latency fit --trtexec-times t512.json t1024.json \\
      --trtexec-shape past_len=512,new_tokens=1 --trtexec-shape past_len=1024,new_tokens=1 -o trt.yaml
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "fit",
        help="fit the position-dependent decode model: samples -> calibration.yaml",
        description="Fit per config a monotone piecewise-linear decode model T(past_len) (knots chosen by "
        "leave-one-position-out cross-validation), prefill a+b*S+c*S^2, residual quantiles and the "
        "factorised model for unmeasured configs; write calibration.yaml and print the fit table.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("samples", nargs="?", metavar="SAMPLES.csv", help="samples file written by `sweep`/`calibrate`")
    p.add_argument("-o", "--output", default="calibration.yaml", metavar="CAL", help="output (default: %(default)s)")
    p.add_argument("--trtexec-times", nargs="+", default=[], metavar="FILE",
                   help="trtexec --exportTimes JSON files, one per shape; GPU compute time (computeMs) is used")
    p.add_argument("--trtexec-shape", action="append", default=[], metavar="SPEC",
                   help="shape of each --trtexec-times file, in order, e.g. past_len=512,new_tokens=1 "
                   "(keys: phase, past_len, new_tokens, tier_idx, top_k, num_active_blocks); default: from "
                   "the file name (decode_L512.json, prefill_S128_t0_k1_b4.json)")
    p.add_argument("--engine", metavar="FILE", help="engine/model file whose sha256 goes into the provenance")
    p.add_argument("--backend", help="provenance backend (default: from the samples)")
    p.add_argument("--device", help="provenance device (default: from the samples)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trt_latency.estimator.calibration import save_calibration
    from trt_latency.estimator.fit import fit_samples, format_fit_table
    from trt_latency.estimator.samples import Samples, concat_samples, read_samples
    from trt_latency.estimator.trtexec import trtexec_samples

    parts: list[Samples] = []
    if args.samples:
        parts.append(read_samples(args.samples))
    if args.trtexec_times:
        for name in args.trtexec_times:  # before the file-name shape check, which would hide a typo
            if not Path(name).is_file():
                raise SamplesError("file not found", path=name, expected="a trtexec --exportTimes JSON file")
        parts.append(trtexec_samples(args.trtexec_times, args.trtexec_shape or None))
    elif args.trtexec_shape:
        raise SamplesError(field="--trtexec-shape", expected="--trtexec-times FILE... to go with it")
    if not parts:
        raise SamplesError(field="SAMPLES.csv", expected="a samples file or --trtexec-times FILE...")
    provenance: dict[str, object] = {}
    if args.engine:
        try:
            digest = hashlib.sha256()
            with Path(args.engine).open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as exc:
            raise InputError(f"cannot read ({exc.strerror or exc})", path=args.engine) from None
        provenance["engine_sha256"] = digest.hexdigest()
        provenance["engine"] = str(args.engine)
    if args.backend:
        provenance["backend"] = args.backend
    if args.device:
        provenance["device"] = args.device
    cal = fit_samples(concat_samples(parts), provenance=provenance)
    out = save_calibration(cal, args.output)
    print(format_fit_table(cal))
    if any(c.batch is not None for c in cal.configs):  # batched decode rows: the T(B, X) curves too
        from trt_latency.estimator.batch_fit import format_batch_table

        print(format_batch_table(cal), end="")
    print(f"wrote {out}")
    return 0
