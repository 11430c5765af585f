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
FORBIDDEN = {
    "engines": ("trt_latency.estimator", "trt_latency.serving"),
    "estimator": ("trt_latency.engines", "trt_latency.serving", "trt_latency.cli"),
    "ext": ("trt_latency.engines", "trt_latency.estimator", "trt_latency.serving", "trt_latency.cli"),
    "serving": ("trt_latency.cli",),
}
# serving/ builds on estimator/; of engines/ only the load generator may import (it runs real engine
# calls: open_runner, the model's metadata, the plan), and nothing else of serving/ may.
SERVING_ENGINE_USERS = {"loadgen.py"}
NEUTRAL = ("trt_latency/schema.py", "trt_latency/errors.py", "trt_latency/stats.py", "ext/layout.py")


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
    layers = ("trt_latency.engines", "trt_latency.estimator", "trt_latency.serving", "trt_latency.cli", "onnx",
              "onnxruntime", "tensorrt", "tqdm", "matplotlib")
    names = [n for n in _imports(ROOT / path) if n.startswith(layers)]
    assert not names, names


@pytest.mark.parametrize("name", ["class ConfigKey", "SAMPLES_COLUMNS:", "REQUEST_COLUMNS:", "TOKEN_MAX =",
                                  "CODE_BAD =", "NCOL =", "class Tally", "class Gate"])
def test_defined_once(name: str) -> None:
    """One home for each: a second definition anywhere in the sources (Python or Cython) fails."""
    files = [p for folder in ("engines", "estimator", "serving", "ext", "trt_latency")
             for pattern in ("*.py", "*.pyx", "*.pxd") for p in (ROOT / folder).rglob(pattern)]
    homes = [str(p.relative_to(ROOT)) for p in files
             if any(line.startswith(name) or line.startswith("cdef " + name) for line in p.read_text().splitlines())]
    assert len(homes) == 1, homes


def test_the_kernels_do_not_import_the_reference() -> None:
    text = (ROOT / "ext" / "_kernels.pyx").read_text()
    assert "_reference" not in text.replace("pure-Python reference", "")


def test_a_mistyped_verb_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import trt_latency.cli as cli

    monkeypatch.setattr(cli, "VERBS", (*cli.VERBS, "admitt"))
    with pytest.raises(ModuleNotFoundError, match="trt_latency.cli.admitt"):
        cli.build_parser()


def test_progress_bars_draw_only_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """A calibrate logged to a file must not hold bar redraws: stderr here is not a terminal."""
    pytest.importorskip("tqdm")
    from trt_latency.engines.sweep import _progress

    bar = _progress(500, "sweep", True)
    for _ in range(500):
        bar.update(1)
    bar.close()
    assert capsys.readouterr().err == ""
