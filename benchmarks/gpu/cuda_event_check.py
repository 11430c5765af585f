"""GPU host check of the shared CUDA layer (never run in CI; needs a GPU, cuda-bindings and torch).

Times the same device-to-device copies of a known size with trt_latency.engines.cuda events and
with torch.cuda.Event recorded on the same stream, alternating which pair is the outer one so
neither gets the event-record overhead systematically. Prints both medians, the bandwidth each
implies, and whether they agree within 10%; writes cuda_event_check.json to --out (default $OUT).
Also checks that the copy really moved the bytes. Runs in well under a minute.

    python benchmarks/gpu/cuda_event_check.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TOLERANCE = 0.10


def _cuda_layer() -> Any:
    """trt_latency.engines.cuda when installed, else engines/cuda.py from this checkout."""
    try:
        from trt_latency.engines import cuda
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from engines import cuda  # type: ignore[no-redef]
    return cuda


def run(nbytes: int, copies: int, samples: int) -> dict[str, Any]:
    cuda = _cuda_layer()

    if cuda.device_count() == 0:
        raise SystemExit("no CUDA device visible: run this on a GPU host")
    try:
        import torch
    except ImportError:
        raise SystemExit("torch is not installed: the check compares against torch.cuda.Event") from None
    if not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device")
    torch.cuda.init()
    cuda.require_device(0)

    ours_ms: list[float] = []
    torch_ms: list[float] = []
    with (
        cuda.DeviceBuffer(nbytes) as src,
        cuda.DeviceBuffer(nbytes) as dst,
        cuda.Stream() as stream,
        cuda.EventTimer() as timer,
    ):
        # torch records its events on our stream: same handle, same copies.
        torch_stream = torch.cuda.ExternalStream(stream.ptr)
        t_start = torch.cuda.Event(enable_timing=True)
        t_end = torch.cuda.Event(enable_timing=True)

        def copies_work() -> None:
            for _ in range(copies):
                dst.copy_from_device(src, stream=stream)

        src.memset(0xA5, stream=stream)
        dst.memset(0, stream=stream)
        copies_work()  # warm-up
        stream.synchronize()
        probe = np.empty(min(nbytes, 1 << 20), dtype=np.uint8)
        dst.copy_to_host(probe, offset=nbytes - probe.nbytes, stream=stream)
        copied_ok = bool((probe == 0xA5).all())

        for i in range(samples):
            if i % 2 == 0:  # ours outside, torch inside
                timer.start(stream)
                t_start.record(torch_stream)
                copies_work()
                t_end.record(torch_stream)
                timer.stop(stream)
            else:  # torch outside, ours inside
                t_start.record(torch_stream)
                timer.start(stream)
                copies_work()
                timer.stop(stream)
                t_end.record(torch_stream)
            ours_ms.append(timer.elapsed_ms() / copies)
            t_end.synchronize()
            torch_ms.append(t_start.elapsed_time(t_end) / copies)

    ours = float(np.median(ours_ms))
    theirs = float(np.median(torch_ms))
    rel = abs(ours - theirs) / theirs
    gbps = lambda ms: 2.0 * nbytes / (ms * 1e-3) / 1e9  # noqa: E731  read + write per copy
    return {
        "device": cuda.device_name(0),
        "nbytes": nbytes,
        "copies_per_sample": copies,
        "samples": samples,
        "copied_bytes_ok": copied_ok,
        "cuda_bindings_ms_per_copy_median": ours,
        "torch_ms_per_copy_median": theirs,
        "cuda_bindings_ms_per_copy": ours_ms,
        "torch_ms_per_copy": torch_ms,
        "relative_difference": rel,
        "tolerance": TOLERANCE,
        "agree": bool(rel <= TOLERANCE),
        "bandwidth_gbps_cuda_bindings": gbps(ours),
        "bandwidth_gbps_torch": gbps(theirs),
        "memcpy_bandwidth_gbps": cuda.memcpy_bandwidth_gbps(nbytes),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "unix_time": time.time(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for cuda_event_check.json")
    parser.add_argument("--mib", type=int, default=256, help="bytes per copy, MiB (default 256)")
    parser.add_argument("--copies", type=int, default=8, help="copies between one event pair (default 8)")
    parser.add_argument("--samples", type=int, default=20, help="event-pair samples (default 20)")
    args = parser.parse_args(argv)

    result = run(args.mib << 20, args.copies, args.samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_event_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"device: {result['device']}")
    print(f"copy of {args.mib} MiB, {args.copies} copies x {args.samples} samples, bytes copied ok: "
          f"{result['copied_bytes_ok']}")
    print(f"engines.cuda events : {result['cuda_bindings_ms_per_copy_median']:.4f} ms/copy "
          f"({result['bandwidth_gbps_cuda_bindings']:.0f} GB/s)")
    print(f"torch.cuda.Event    : {result['torch_ms_per_copy_median']:.4f} ms/copy "
          f"({result['bandwidth_gbps_torch']:.0f} GB/s)")
    print(f"memcpy_bandwidth_gbps(): {result['memcpy_bandwidth_gbps']:.0f} GB/s")
    verdict = "AGREE" if result["agree"] else "DISAGREE"
    print(f"relative difference {result['relative_difference']:.2%} (tolerance {TOLERANCE:.0%}): {verdict}")
    print(f"wrote {out / 'cuda_event_check.json'}")
    return 0 if result["agree"] and result["copied_bytes_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
