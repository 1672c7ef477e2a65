"""Build glue: Cython extensions in recsvc/_fastpath and gRPC code generation.

Everything declarative lives in pyproject.toml; this file only does what needs
code: compiling every ``recsvc/_fastpath/*.pyx`` and running protoc before the
Python sources are collected (so wheels and editable installs both carry
``recsvc.v1``).
"""

import importlib.util
import os
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent

# One place for compiler directives. RECSVC_DEBUG_BUILD=1 turns bounds and
# wraparound checks back on for a debug build.
DEBUG = os.environ.get("RECSVC_DEBUG_BUILD", "") not in ("", "0")
DIRECTIVES = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}
NPYRANDOM_LIB = str(Path(np.get_include()).parent.parent / "random" / "lib")
CFLAGS = ["-O0", "-g"] if DEBUG else ["-O3"]


# _sampling reproduces numpy's Beta draws bit for bit: no fused multiply-add
# contraction (it is on by default where FMA is baseline, e.g. arm64).
EXTRA_CFLAGS = {"recsvc._fastpath._sampling": ["-ffp-contract=off"]}


def fastpath_extensions():
    exts = []
    for pyx in sorted((HERE / "recsvc" / "_fastpath").glob("*.pyx")):
        rel = pyx.relative_to(HERE)
        name = ".".join(rel.with_suffix("").parts)
        exts.append(
            Extension(
                name,
                [str(rel)],
                include_dirs=[np.get_include(), str(HERE / "recsvc" / "_fastpath")],  # _simd.h
                # numpy's random C API (random_beta, bitgen_t) is a static lib.
                library_dirs=[NPYRANDOM_LIB],
                libraries=["npyrandom", "m"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=CFLAGS + EXTRA_CFLAGS.get(name, []),
            )
        )
    return cythonize(exts, compiler_directives=DIRECTIVES, quiet=True)


class BuildPyWithCodegen(build_py):
    """Generate recsvc.v1 from proto/ before collecting Python modules."""

    def run(self):
        # Load the codegen module by path: importing the recsvc package here
        # would pull in runtime dependencies the build environment lacks.
        spec = importlib.util.spec_from_file_location(
            "_recsvc_codegen", HERE / "recsvc" / "_codegen.py"
        )
        codegen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(codegen)
        codegen.generate()
        super().run()


setup(
    ext_modules=fastpath_extensions(),
    cmdclass={"build_py": BuildPyWithCodegen},
)
