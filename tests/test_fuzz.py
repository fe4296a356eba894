"""The fuzz targets in fuzz/: every stored input replays clean, and a short atheris run of each
target (on the compiled head reader where it has one) finds nothing.

A target is a fuzz/<name>.py with a ``check(data)`` and its inputs in fuzz/corpus/<name>/;
see fuzz/README.md for longer sessions.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.compiled import ROOT, compiled_build

FUZZ = ROOT / "fuzz"
TARGETS = sorted(p.stem for p in FUZZ.glob("*.py") if "\ndef check(" in p.read_text())
# Targets that read heads run again on the compiled build: the Cython reader is what serves.
COMPILED_TARGETS = {"heads_request", "heads_response"}
RUNS = 20_000


def corpus(target: str) -> list[Path]:
    return sorted((FUZZ / "corpus" / target).iterdir())


def test_every_target_has_a_corpus() -> None:
    assert {"heads_request", "heads_response", "config_loader"} <= set(TARGETS)
    for target in TARGETS:
        assert len(corpus(target)) >= 10, target


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays_clean(target: str) -> None:
    check = importlib.import_module(f"fuzz.{target}").check
    for path in corpus(target):
        check(path.read_bytes())


@pytest.mark.parametrize(
    "target, compiled",
    [(t, False) for t in TARGETS] + [(t, True) for t in sorted(COMPILED_TARGETS)],
)
def test_short_fuzz_run_finds_nothing(tmp_path: Path, target: str, compiled: bool) -> None:
    inputs = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / target, inputs)  # libFuzzer adds what it finds to this folder
    paths = [str(compiled_build())] if compiled else [str(ROOT / "src")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*paths, str(ROOT)]),
        "APIGATE_FUZZ_REQUIRE_COMPILED": "1" if compiled else "0",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            f"fuzz.{target}",
            f"-runs={RUNS}",
            "-max_total_time=20",
            "-timeout=10",
            f"-artifact_prefix={tmp_path}/",
            str(inputs),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Done" in done.stderr, done.stderr[-2000:]
