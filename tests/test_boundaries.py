"""The layout shows the data flow (ARCHITECTURE.md, docs/decisions.md): who may import whom, and the
names that are defined once. Imports are read with ast from the source folders, so a lazy import
inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the trt_latency packages it must not import
# diagnostics/ (analyze, causes, compare, their plots) sits above estimator/ and serving/: an offline
# consumer of request logs and calibrations that runs no engine; nothing below it, the admission path
# included, may import it.
FORBIDDEN = {
    "engines": ("trt_latency.estimator", "trt_latency.serving", "trt_latency.diagnostics"),
    "estimator": ("trt_latency.engines", "trt_latency.serving", "trt_latency.cli", "trt_latency.diagnostics"),
    "ext": ("trt_latency.engines", "trt_latency.estimator", "trt_latency.serving", "trt_latency.cli",
            "trt_latency.diagnostics"),
    "serving": ("trt_latency.cli", "trt_latency.diagnostics"),
    "diagnostics": ("trt_latency.cli", "trt_latency.engines"),
}
# serving/ builds on estimator/; of engines/ only the load generator may import (it runs real engine
# calls: open_runner, the model's metadata, the plan), and nothing else of serving/ may.
SERVING_ENGINE_USERS = {"loadgen.py"}
NEUTRAL = ("trt_latency/schema.py", "trt_latency/errors.py", "trt_latency/stats.py", "trt_latency/formats.py",
           "ext/layout.py")


def _imports(path: Path) -> list[str]:
    if path.suffix == ".pyx":  # Cython: not Python syntax; its import lines are
        return [m.group(1) for m in re.finditer(r"^\s*(?:from|import|cimport)\s+([\w.]+)", path.read_text(), re.M)]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _sources(folder: str) -> list[Path]:
    return sorted(p for pattern in ("*.py", "*.pyx") for p in (ROOT / folder).rglob(pattern))


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_directions(folder: str) -> None:
    bad = [f"{p.relative_to(ROOT)} imports {name}" for p in _sources(folder) for name in _imports(p)
           if name.startswith(FORBIDDEN[folder])]
    assert not bad, "\n".join(bad)


def test_serving_uses_engines_only_in_the_load_generator() -> None:
    users = {p.name for p in _sources("serving") if any(n.startswith("trt_latency.engines") for n in _imports(p))}
    assert users <= SERVING_ENGINE_USERS, users
    assert users, "the load generator runs real engines: this rule describes a real import"


# The serve extra: only the server's own modules import it (the admission path never does).
SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client", "tokenizers", "starlette")
SERVE_EXTRA_USERS = {"serving/http_app.py", "serving/metrics.py", "trt_latency/cli/serve.py"}


def test_only_the_server_imports_the_serve_extra() -> None:
    users = {str(p.relative_to(ROOT)) for folder in ("engines", "estimator", "serving", "ext", "trt_latency")
             for p in _sources(folder) if any(n.startswith(SERVE_EXTRA) for n in _imports(p))}
    assert users <= SERVE_EXTRA_USERS, users
    assert users, "the server imports its extra: this rule describes a real import"


@pytest.mark.parametrize("path", NEUTRAL)
def test_neutral_modules_import_no_layer(path: str) -> None:
    """schema / errors / layout are below every layer: they import none."""
    layers = ("trt_latency.engines", "trt_latency.estimator", "trt_latency.serving", "trt_latency.cli",
              "trt_latency.diagnostics", "onnx",
              "onnxruntime", "tensorrt", "tqdm", "matplotlib")
    names = [n for n in _imports(ROOT / path) if n.startswith(layers)]
    assert not names, names


@pytest.mark.parametrize("name", ["class ConfigKey", "SAMPLES_COLUMNS:", "REQUEST_COLUMNS:", "TOKEN_MAX =",
                                  "CODE_BAD =", "NCOL =", "class Tally", "class Gate", "BUCKETS:"])
def test_defined_once(name: str) -> None:
    """One home for each: a second definition anywhere in the sources (Python or Cython) fails."""
    files = [p for folder in ("engines", "estimator", "serving", "ext", "diagnostics", "trt_latency")
             for pattern in ("*.py", "*.pyx", "*.pxd") for p in (ROOT / folder).rglob(pattern)]
    homes = [str(p.relative_to(ROOT)) for p in files
             if any(line.startswith(name) or line.startswith("cdef " + name) for line in p.read_text().splitlines())]
    assert len(homes) == 1, homes


COMPILED = ("trt_latency.ext._kernels", "trt_latency.serving._gate", "trt_latency.serving._batch")


def test_one_native_switch() -> None:
    """trt_latency/_native.py alone picks compiled or reference for every kernel (issue 26.5). It sits below
    the layers (estimator/ and serving/ both read its decision), so its only package imports are the
    compiled modules; no other Python source imports one of them or reads TRT_LATENCY_PUREPYTHON."""
    native = ROOT / "trt_latency" / "_native.py"
    own = {n for n in _imports(native) if n.startswith("trt_latency")}
    assert own == {"trt_latency.ext", "trt_latency.serving", *COMPILED}, own
    others = [p for folder in ("engines", "estimator", "serving", "ext", "trt_latency") for p in _sources(folder)
              if p.suffix == ".py" and p != native]
    importers = [f"{p.relative_to(ROOT)}: {n}" for p in others for n in _imports(p) if n in COMPILED]
    assert not importers, importers
    readers = [str(p.relative_to(ROOT)) for p in [native, *others] if '"TRT_LATENCY_PUREPYTHON"' in p.read_text()]
    assert readers == ["trt_latency/_native.py"], readers


def _module_file(module: str) -> Path | None:
    """The source of a trt_latency module (trt_latency.X -> its folder: engines/, estimator/, ... or trt_latency/)."""
    parts = module.split(".")
    if parts[0] != "trt_latency":
        return None
    mapped = {"engines", "estimator", "serving", "ext", "diagnostics"}
    base = ROOT / parts[1] if len(parts) > 1 and parts[1] in mapped else ROOT / "trt_latency"
    rest = parts[2:] if len(parts) > 1 and parts[1] in mapped else parts[1:]
    for suffix in (".py", ".pyx"):
        candidate = base.joinpath(*rest).with_suffix(suffix) if rest else None
        if candidate is not None and candidate.is_file():
            return candidate
    return base.joinpath(*rest, "__init__.py") if (base.joinpath(*rest, "__init__.py")).is_file() else None


def test_no_module_imports_another_modules_private_names() -> None:
    """`from M import _name` across modules reaches into M's internals (issue 26: cluster.py did into
    pipeline.py, and the copies drifted). A private *submodule* (``from trt_latency.ext import _kernels``,
    a compiled module) is a module, not a name, and is allowed."""
    bad = []
    for folder in ("engines", "estimator", "serving", "ext", "diagnostics", "trt_latency"):
        for path in _sources(folder):
            if path.suffix != ".py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                    continue
                source = _module_file(node.module)
                if source is None or source.resolve() == path.resolve():
                    continue
                for alias in node.names:
                    name = alias.name
                    if not name.startswith("_") or name.startswith("__"):
                        continue
                    pkg = source.parent if source.name == "__init__.py" else None
                    if pkg is not None and any((pkg / f"{name}{s}").is_file() for s in (".py", ".pyx", ".pxd")):
                        continue  # a submodule
                    bad.append(f"{path.relative_to(ROOT)}: from {node.module} import {name}")
    assert not bad, "\n".join(bad)


def test_the_kernels_do_not_import_the_reference() -> None:
    text = (ROOT / "ext" / "_kernels.pyx").read_text()
    assert "_reference" not in text.replace("pure-Python reference", "")


def test_a_mistyped_verb_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import trt_latency.cli as cli

    monkeypatch.setattr(cli, "VERBS", (*cli.VERBS, "admitt"))
    with pytest.raises(ModuleNotFoundError, match="trt_latency.cli.admitt"):
        cli.build_parser()


@pytest.mark.parametrize(("argv", "options"), [
    (["analyze", "r.csv"], "trt_latency.diagnostics.run:AnalyzeOptions"),
    (["compare", "r.csv"], "trt_latency.diagnostics.run:CompareOptions"),
    (["loadtest", "-c", "cal.yaml"], "trt_latency.loadtest:LoadtestOptions"),
])
def test_a_verb_hands_the_library_a_dataclass(argv: list[str], options: str) -> None:
    """The library takes an options dataclass, never the Namespace: every flag of the verb but the printing
    ones (--json, --debug) is a field, so from_namespace drops none."""
    import dataclasses
    import importlib

    from trt_latency.cli import build_parser

    module, name = options.split(":")
    cls = getattr(importlib.import_module(module), name)
    ns = build_parser().parse_args(argv)
    flags = set(vars(ns)) - {"func", "verb", "parser", "json", "debug"}
    assert flags <= {f.name for f in dataclasses.fields(cls)}, flags - {f.name for f in dataclasses.fields(cls)}
    def same(value: object) -> object:  # a list flag (nargs) may be kept as a tuple (frozen options)
        return tuple(value) if isinstance(value, list | tuple) else value

    opts = cls.from_namespace(ns)
    assert {k: same(getattr(opts, k)) for k in flags} == {k: same(getattr(ns, k)) for k in flags}


def test_progress_bars_draw_only_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """A calibrate logged to a file must not hold bar redraws: stderr here is not a terminal."""
    pytest.importorskip("tqdm")
    from trt_latency.engines.sweep import progress_bar

    bar = progress_bar(500, "sweep", True)
    for _ in range(500):
        bar.update(1)
    bar.close()
    assert capsys.readouterr().err == ""
