"""Build hook: compile the data plane's hot modules when installing for use.

The engine is plain, fully annotated Python; mypyc turns the classes of these modules into C
extension types with native attribute access, which measured about 1.35x the proxy's
requests/s (docs/benchmarks.md); the policies' per-request paths (``policies/*/hotpath.py``, kept
free of pydantic) are compiled with them. Cython compiles the head reader (engine/heads.py, typed by
its .pxd), a byte loop that is only worth running as C, and the access log's batch of lines
(observe/accesslog/render.py, whose .pxd holds the C). The Python sources stay the reference:
editable installs (development) and ``APIGATE_PURE=1`` skip compiling, so an edited .py is
never shadowed by a stale build, and a build that cannot compile falls back to the
pure-Python engine. Compiling happens inside build_ext only, so metadata steps stay fast.
"""

from __future__ import annotations

import os
import sys

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "src/apigate/consumers/keyindex.py",
    "src/apigate/engine/balancers.py",
    "src/apigate/engine/breakers.py",
    "src/apigate/engine/client.py",
    "src/apigate/engine/exchange.py",
    "src/apigate/engine/framing.py",
    "src/apigate/engine/metrics.py",
    "src/apigate/engine/paths.py",
    "src/apigate/engine/plan.py",
    "src/apigate/engine/replies.py",
    "src/apigate/engine/retries.py",
    "src/apigate/engine/router.py",
    "src/apigate/engine/tracing.py",
    "src/apigate/engine/upstream.py",
    "src/apigate/engine/window.py",
    "src/apigate/engine/wire.py",
    "src/apigate/observe/accesslog/hotpath.py",
    "src/apigate/policies/cache/hotpath.py",
    "src/apigate/policies/compression/hotpath.py",
    "src/apigate/policies/cors/hotpath.py",
    "src/apigate/policies/jwt/hotpath.py",
    "src/apigate/policies/key_auth/hotpath.py",
    "src/apigate/policies/limits/algorithms.py",
    "src/apigate/policies/limits/calendar.py",
    "src/apigate/policies/limits/hotpath.py",
    "src/apigate/policies/limits/hybrid.py",
    "src/apigate/policies/limits/keys.py",
    "src/apigate/policies/security_headers/hotpath.py",
    "src/apigate/policies/transform/bodymap.py",
    "src/apigate/policies/transform/hotpath.py",
    "src/apigate/policies/transform/jsonsplice.py",
    "src/apigate/state/calls.py",
]
COMPILED_BY_CYTHON = ["src/apigate/engine/heads.py", "src/apigate/observe/accesslog/render.py"]


def compile_with_mypyc() -> list:
    try:
        from mypyc.build import mypycify

        # Only the compiled modules must type-check; the rest is read for types, not judged.
        return mypycify(["--ignore-missing-imports", "--follow-imports=silent", *COMPILED], opt_level="3")
    except (ImportError, SystemExit, Exception) as exc:  # the modules stay Python and still work
        print(f"apigate: engine classes stay Python ({type(exc).__name__}: {exc})", file=sys.stderr)
        return []


def compile_with_cython() -> list:
    try:
        from Cython.Build import cythonize

        return cythonize(COMPILED_BY_CYTHON, compiler_directives={"language_level": 3}, quiet=True)
    except (ImportError, Exception) as exc:  # llhttp then reads every head, Python makes log lines
        print(f"apigate: the head reader and the log lines stay Python ({type(exc).__name__}: {exc})", file=sys.stderr)
        return []


class CompileEngine(build_ext):
    def finalize_options(self) -> None:
        # Decided here, not at import: metadata steps never compile, and editable_mode is known.
        editable = self.inplace or self.editable_mode or "editable_wheel" in sys.argv
        skip = editable or os.environ.get("APIGATE_PURE") == "1"
        if not skip:
            self.distribution.ext_modules = [*compile_with_mypyc(), *compile_with_cython()]
        super().finalize_options()


class MaybeBinary(Distribution):
    """Always run build_ext (it decides whether to compile), so wheels carry the compiled engine."""

    def has_ext_modules(self) -> bool:
        return True


setup(distclass=MaybeBinary, cmdclass={"build_ext": CompileEngine})
