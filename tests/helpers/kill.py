"""Kill a writer at a row count it signals itself (no polling of the file, no race on a fast or slow machine).

The child runs with TRT_LATENCY_TEST_STOP_AFTER_ROWS=N (trt_latency/formats.py's test hook): samples.csv's
writer makes its first N rows durable and stops the process with SIGSTOP. The parent waits for that stop,
SIGKILLs the child and checks the signal ended it, so the file then holds exactly N new rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trt_latency.formats import STOP_AFTER_ROWS_ENV

TORN_ROW = b"0,1,2,1,decode,12"  # a row cut mid-way (no newline), as a kill during a write leaves it


def kill_at_rows(script: str, rows: int, torn: Path | None = None, timeout: float = 300.0) -> None:
    """Run ``script`` (it prints "ready" once set up, then writes samples.csv) until its writer has written
    ``rows`` rows and stopped itself; SIGKILL it there. With ``torn``, append a partial row to that file
    afterwards, as a kill in the middle of a write would (the resume must cut it)."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            env={**os.environ, STOP_AFTER_ROWS_ENV: str(rows)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + timeout
        while True:  # the child's state, not the file: stopped (the hook fired) or exited (it never did)
            pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
            if pid:
                assert os.WIFSTOPPED(status), f"the child ended before writing {rows} rows (status {status})"
                break
            assert time.monotonic() < deadline, f"the child did not reach {rows} rows in {timeout} s"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if torn is not None:
        with torn.open("ab") as fh:
            fh.write(TORN_ROW)
