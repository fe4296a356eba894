"""The engine as `pip install .` builds it (Cython and mypyc modules), built once per source
hash into a cache directory, for the tests that run the compiled modules."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "apigate-test-builds"


def compiled_build() -> Path:
    digest = hashlib.sha256()
    sources = [p for p in sorted((ROOT / "src" / "apigate").rglob("*")) if p.suffix in (".py", ".pxd")]
    for path in [*sources, ROOT / "setup.py"]:
        digest.update(path.read_bytes())
    build = CACHE / digest.hexdigest()[:16]
    if (build / "apigate").is_dir():
        return build
    staging = CACHE / f"staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(staging)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shutil.copytree(ROOT / "src" / "apigate", staging / "apigate", dirs_exist_ok=True)
    try:
        staging.rename(build)
    except OSError:  # another test process finished the same build first
        shutil.rmtree(staging, ignore_errors=True)
    return build
