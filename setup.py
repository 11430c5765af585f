"""Build for trt-latency.

Five code folders (engines/, estimator/, serving/, ext/, diagnostics/) are mapped into one import namespace,
`trt_latency`, so nothing generic lands in site-packages. The Cython modules (ext/*.pyx, the math
core and kernels; serving/*.pyx, the serving loop's gate) are
optional at build time (msgpack-python's pattern): if the compiler or Cython is missing
the package still installs and falls back to the pure-Python reference, saying so once.
Set TRT_LATENCY_REQUIRE_EXT=1 to make a failed extension build an error (CI does).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.extension import Extension


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
        sys.stderr.write(f"trt-latency: Cython extension not built ({exc}); using the pure-Python reference\n")


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


def extensions() -> list[Extension]:
    try:
        import numpy
        from Cython.Build import cythonize

        write_layout_pxi()
        sources = [(pkg, src) for folder, pkg in CYTHON_FOLDERS.items()
                   for src in sorted(glob.glob(os.path.join(folder, "*.pyx")))]
        exts = [
            Extension(
                pkg + "." + os.path.splitext(os.path.basename(src))[0],
                [src],
                include_dirs=[numpy.get_include(), "ext", "."],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=["-O3"],
            )
            for pkg, src in sources
        ]
        return cythonize(
            exts,
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
    cmdclass={"build_ext": OptionalBuildExt},
)
