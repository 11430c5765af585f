"""Errors a user can act on.

Every error the CLI reports is one line that names the file, the place in it (row or field)
and what was expected; `trt-latency` prints `str(error)` and exits 1 (no traceback unless --debug).
"""

from __future__ import annotations

import os


class TrtLatencyError(Exception):
    """Base class for every error trt-latency raises on purpose."""


class InputError(TrtLatencyError):
    """A file or value a user supplied is missing or malformed.

    Formats as ``<path>: <where>: expected <expected>, got <got>`` with the parts that are known.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        field: str | None = None,
        row: int | None = None,
        expected: str | None = None,
        got: object = None,
    ) -> None:
        self.path = None if path is None else os.fspath(path)
        self.field = field
        self.row = row
        self.expected = expected
        self.got = got
        parts: list[str] = []
        if self.path is not None:
            parts.append(self.path)
        where = []
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        if where:
            parts.append(", ".join(where))
        detail = message or ""
        if expected is not None:
            detail = (detail + "; " if detail else "") + f"expected {expected}"
            if got is not None:
                detail += f", got {got!r}"
        if detail:
            parts.append(detail)
        super().__init__(": ".join(parts) if parts else "invalid input")


class ConfigError(InputError):
    """A YAML config (tiers, sweep plan) is invalid."""


class SamplesError(InputError):
    """A samples.csv / trtexec times file is invalid."""


class RequestLogError(InputError):
    """A request log CSV is invalid."""


class CalibrationError(InputError):
    """A calibration.yaml is missing, malformed or fails validation."""


class BackendUnavailable(TrtLatencyError):
    """The requested runtime (TensorRT, a CUDA provider, ...) is not usable on this machine."""
