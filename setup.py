"""Build for trt-latency.

Five code folders (engines/, estimator/, serving/, ext/, diagnostics/) are mapped into one import namespace,
`trt_latency`, so nothing generic lands in site-packages. The Cython modules (ext/*.pyx, the math
core and kernels; serving/*.pyx, the serving loop's gate) are
optional when installing (msgpack-python's pattern): if the compiler or Cython is missing, `pip install`
still installs and falls back to the pure-Python reference, with a banner (`pip install -v` shows it; the
package says so again when imported). Set TRT_LATENCY_REQUIRE_EXT=1 to make a failed extension build an
error (CI does).

A wheel for others to install must not lack the kernels silently: `python -m build` / `bdist_wheel` outside
pip refuses when any kernel failed to compile, unless TRT_LATENCY_ALLOW_PURE_PYTHON=1 asks for a
pure-Python wheel on purpose. (pip's own build for the machine it installs on, from an sdist or a source
tree, keeps the fallback: pip marks its builds with PIP_BUILD_TRACKER, or PIP_REQ_TRACKER before pip 22.1.)
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext
from setuptools.extension import Extension

FAILED: list[str] = []  # why each kernel (or the cythonize step) did not build, in this process


class OptionalBuildExt(build_ext):
    """Build the Cython kernels, but never let a compiler failure break installation."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback"
            self._skip(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        if os.environ.get("TRT_LATENCY_REQUIRE_EXT") == "1":
            raise exc
        FAILED.append(f"{type(exc).__name__}: {exc}")
        bar = "!" * 100
        sys.stderr.write(f"{bar}\ntrt-latency: WARNING: a Cython kernel was NOT built ({exc}).\n"
                         "trt-latency: this install falls back to the pure-Python reference (same answers, "
                         "~100x slower admission).\ntrt-latency: install a C compiler and Cython >= 3, then "
                         f"reinstall; TRT_LATENCY_REQUIRE_EXT=1 makes this an error.\n{bar}\n")


class KernelWheel(bdist_wheel):
    """A wheel for distribution carries the compiled kernels, or is a pure-Python one asked for by name."""

    def run(self) -> None:
        self.run_command("build")  # compiles the kernels first (FAILED says which did not); run once
        under_pip = bool(os.environ.get("PIP_BUILD_TRACKER") or os.environ.get("PIP_REQ_TRACKER"))
        if FAILED and not under_pip and os.environ.get("TRT_LATENCY_ALLOW_PURE_PYTHON") != "1":
            raise SystemExit(
                "trt-latency: refusing to build a wheel without the compiled Cython kernels ("
                + "; ".join(FAILED) + "). Fix the compiler / Cython, or set TRT_LATENCY_ALLOW_PURE_PYTHON=1 "
                "to build a pure-Python wheel on purpose.")
        super().run()


# Source folder -> package, for every folder holding .pyx modules.
CYTHON_FOLDERS = {"ext": "trt_latency.ext", "serving": "trt_latency.serving"}


def write_layout_pxi() -> None:
    """ext/_layout.pxi: the C enums of ext/layout.py (the one place the table layout is written)."""
    import runpy

    text = runpy.run_path(os.path.join("ext", "layout.py"))["pxd_enums"]()
    target = os.path.join("ext", "_layout.pxi")
    if not os.path.exists(target) or open(target, encoding="utf-8").read() != text:
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(text)


CIMPORT_ROOT = os.path.join("build", "cimport")


def write_cimport_tree() -> str:
    """build/cimport/trt_latency/ext/: the shipped .pxd (and its .pxi) under its installed package path.

    The .pyx files cimport the math core by its full name (`from trt_latency.ext._kernels cimport ...`), as
    anyone downstream does against an installed package; in the source tree the package trt_latency.ext is
    the folder ext/, so the build resolves that name through this small tree on Cython's include path.
    """
    pkg = os.path.join(CIMPORT_ROOT, "trt_latency", "ext")
    os.makedirs(pkg, exist_ok=True)
    files = {os.path.join(os.path.dirname(pkg), "__init__.pxd"): "", os.path.join(pkg, "__init__.pxd"): ""}
    for name in ("_kernels.pxd", "_layout.pxi"):
        with open(os.path.join("ext", name), encoding="utf-8") as src:
            files[os.path.join(pkg, name)] = src.read()
    for target, text in files.items():  # rewritten only when changed: an unchanged copy triggers no recompile
        if not os.path.exists(target) or open(target, encoding="utf-8").read() != text:
            with open(target, "w", encoding="utf-8") as dst:
                dst.write(text)
    return CIMPORT_ROOT


def extensions() -> list[Extension]:
    try:
        import numpy
        from Cython.Build import cythonize

        write_layout_pxi()
        cimport_root = write_cimport_tree()
        sources = [(pkg, src) for folder, pkg in CYTHON_FOLDERS.items()
                   for src in sorted(glob.glob(os.path.join(folder, "*.pyx")))]
        exts = [
            Extension(
                pkg + "." + os.path.splitext(os.path.basename(src))[0],
                [src],
                include_dirs=[numpy.get_include(), "ext", cimport_root],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=["-O3"],
            )
            for pkg, src in sources
        ]
        return cythonize(
            exts,
            include_path=[cimport_root],
            language_level=3,
            compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                                 "initializedcheck": False, "embedsignature": True},
        )
    except Exception as exc:  # noqa: BLE001 - a Cython error must not break installation either
        OptionalBuildExt._skip(exc)
        return []


setup(
    packages=[
        "trt_latency",
        "trt_latency.cli",
        "trt_latency.engines",
        "trt_latency.engines.ort",
        "trt_latency.engines.trt",
        "trt_latency.estimator",
        "trt_latency.serving",
        "trt_latency.ext",
        "trt_latency.configs",
        "trt_latency.diagnostics",
    ],
    package_dir={
        "trt_latency": "trt_latency",
        "trt_latency.engines": "engines",
        "trt_latency.estimator": "estimator",
        "trt_latency.serving": "serving",
        "trt_latency.ext": "ext",
        "trt_latency.configs": "configs",
        "trt_latency.diagnostics": "diagnostics",
    },
    package_data={
        "trt_latency": ["py.typed"],
        "trt_latency.ext": ["*.pxd", "*.pyx", "*.pxi"],
        "trt_latency.serving": ["*.pyx"],
        "trt_latency.configs": ["*.yaml"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt, "bdist_wheel": KernelWheel},
)
