"""Which ONNX Runtime this process times: its distribution (flavour), version and execution providers.

trt-latency never installs an ONNX Runtime over the user's (pyproject: no onnxruntime in the base
install): it times whichever flavour is there, `onnxruntime`, `onnxruntime-gpu`, `onnxruntime-openvino`,
`onnxruntime-directml`, ... All of them install the same `onnxruntime` import package, so two of them
in one environment overwrite each other's files, and the version that imports may not be the one a
distribution's metadata claims. :func:`ort_build` says what is installed and what actually imports, for
the calibration's provenance. Imports onnxruntime only when called.
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _provides_onnxruntime(dist: importlib.metadata.Distribution) -> bool:
    """True when the distribution installs the top-level ``onnxruntime`` package (not onnxruntime_genai,
    onnxruntime_extensions, ...)."""
    top = dist.read_text("top_level.txt")
    if top is not None:
        return "onnxruntime" in top.split()
    return any(f.parts[:2] == ("onnxruntime", "__init__.py") for f in dist.files or ())


def ort_distributions() -> list[tuple[str, str]]:
    """(distribution name, version) of every installed distribution that provides ``import onnxruntime``,
    sorted by name: one normally; two or more means they overwrote each other's files."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        norm = _normalized(name)
        if not (norm.startswith("onnxruntime") or norm.startswith("ort-")):
            continue  # cheap name filter first: reading every distribution's file list is slow
        if _provides_onnxruntime(dist):
            found[norm] = dist.version
    return sorted(found.items())


def ort_build() -> dict[str, Any]:
    """{package, version, providers, ...} of the ONNX Runtime that ``import onnxruntime`` loads here.

    ``package``: the distribution that provides it (e.g. "onnxruntime", "onnxruntime-gpu"), None when none is
    installed; ``version``: ``onnxruntime.__version__`` (what really imports); ``providers``: its available
    execution providers; ``library``: the folder it imports from; ``distributions``: every installed flavour
    ({name: version}); ``warning``: why the numbers may not be the runtime's own (several flavours overlaid,
    or the metadata's version differing from the imported one), else absent.
    """
    dists = ort_distributions()
    info: dict[str, Any] = {"package": None, "version": None, "providers": [], "distributions": dict(dists)}
    try:
        import onnxruntime as ort
    except ImportError as exc:
        info["warning"] = f"onnxruntime does not import ({exc})" if dists else "no ONNX Runtime is installed"
        return info
    version = str(getattr(ort, "__version__", "unknown"))
    info["version"] = version
    info["providers"] = list(ort.get_available_providers())
    info["library"] = str(getattr(ort, "__path__", [""])[0])
    matching = [name for name, v in dists if v == version]
    info["package"] = (matching or [name for name, _ in dists] or ["onnxruntime (no distribution metadata)"])[0]
    if len(dists) > 1:
        listed = ", ".join(f"{n} {v}" for n, v in dists)
        info["warning"] = (f"several ONNX Runtime distributions share one onnxruntime package ({listed}); "
                           f"{version} imports, which may not be the one your runtime was built against")
    elif dists and dists[0][1] != version:
        info["warning"] = f"{dists[0][0]} {dists[0][1]} is installed but onnxruntime {version} imports"
    return info
