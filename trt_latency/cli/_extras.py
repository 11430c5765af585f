"""A verb whose optional dependency is missing says which extra to install, in one line (exit 1).

The base install is what Estimator.load and admission need (numpy, pyyaml, tqdm). The ONNX Runtime is
never a hard dependency (the user's runtime brings its own flavour), so the verbs that time a model check
for it before they start, and any verb that still meets a missing optional module gets the same line.
"""

from __future__ import annotations

import argparse
import importlib.util

# top-level module -> (what it is, how to get it)
EXTRAS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("an ONNX Runtime",
                    "pip install 'trt-latency[ort]' (or keep the onnxruntime your runtime uses)"),
    "onnx": ("onnx (to read the model's graph)",
             "pip install onnx (or pip install 'trt-latency[ort]' on a fresh machine)"),
    "matplotlib": ("matplotlib (for plots)", "pip install 'trt-latency[plots]'"),
    "ray": ("Ray", "pip install 'trt-latency[cluster]'"),
}
TIMING_VERBS = ("calibrate", "sweep", "replay", "loadtest")  # they open a runner (ONNX Runtime unless tensorrt)
GRAPH_VERBS = (*TIMING_VERBS, "inspect", "export")  # they read or write an ONNX graph


def available(module: str) -> bool:
    """Whether ``module`` can be imported here (found, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or a module set to None in sys.modules
        return False


def needed(args: argparse.Namespace) -> tuple[str, ...]:
    """The optional modules this verb invocation imports for sure."""
    verb = getattr(args, "verb", "")
    engines_only = bool(getattr(args, "engine", None)) and not getattr(args, "onnx", None)
    on_tensorrt = getattr(args, "backend", None) == "tensorrt" or engines_only
    out: list[str] = []
    if verb in TIMING_VERBS and not on_tensorrt:
        out.append("onnxruntime")
    if verb in GRAPH_VERBS and not engines_only:
        out.append("onnx")
    return tuple(out)


def message(verb: str, module: str) -> str | None:
    """The one line for a missing ``module`` (dotted names count by their top level); None if not an extra's."""
    top = module.partition(".")[0]
    if top not in EXTRAS:
        return None
    what, how = EXTRAS[top]
    return f"trt-latency {verb} needs {what}: {how}"


def missing_line(args: argparse.Namespace) -> str | None:
    """The line for the first module this invocation needs that is not installed, else None."""
    for module in needed(args):
        if not available(module):
            return message(getattr(args, "verb", ""), module)
    return None
