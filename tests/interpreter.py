"""Run a test module's Triton checks in Triton's CPU interpreter, in a fresh Python process.

Why a subprocess: ``TRITON_INTERPRET=1`` must be set before triton is first imported, and in one
pytest process any earlier test (or plugin) may have imported triton already. A module using this
defines ``_checks() -> dict`` (name → [ok, detail]), ends with ``interpreter.main(_checks)`` under
``if __name__ == "__main__"``, declares ``results = checks_fixture(__file__)`` and its tests assert on
that dict (one subprocess per module, so one torch + triton import).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run_checks(test_file: str, timeout: int = 600) -> dict:
    """Run ``python test_file`` with ``TRITON_INTERPRET=1`` and return the JSON dict it prints last."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.path.join(os.path.dirname(HERE), "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(test_file)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"interpreter checks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def checks_fixture(test_file: str):
    """A module-scoped pytest fixture returning :func:`run_checks` of ``test_file`` (skipped without triton)."""
    @pytest.fixture(scope="module")
    def results():
        pytest.importorskip("triton")
        return run_checks(test_file)
    return results


def main(checks) -> None:
    """Entry point of the subprocess: run ``checks()`` under the interpreter and print its dict as JSON."""
    os.environ["TRITON_INTERPRET"] = "1"          # before triton is imported by the checks
    print(json.dumps(checks()))
