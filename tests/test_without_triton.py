"""Without triton installed (a CPU machine with a plain torch): every module of the CPU path imports,
and the test suite collects (tests of Triton kernels skip themselves).

Each check runs in a subprocess whose import system reports triton as missing (a meta-path finder
that raises ModuleNotFoundError), since this process may have imported triton already.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Triton kernel modules: GPU code, imported only where triton is present (kernels/__init__.py decides).
NEEDS_TRITON = {"attention_gluon", "attention_triton", "expand", "fp8", "int4_gemv", "int8_gemm", "quant_jit",
                "triton_act_quant", "weight_only", "weight_requant", "fp8_dynamic"}

BLOCK = textwrap.dedent("""
    import sys
    class NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, NoTriton())
""")


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"),
                                                        os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_cpu_module_imports_without_triton():
    r = _run("""
        import importlib, pkgutil, dvdquant
        failed = []
        for m in pkgutil.walk_packages(dvdquant.__path__, "dvdquant."):
            try:
                importlib.import_module(m.name)
            except ModuleNotFoundError as e:
                failed.append(f"{m.name}: {e.name}")
        print("\\n".join(failed))
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    failed = dict(line.split(": ") for line in r.stdout.split("\n") if line)
    unexpected = {m: n for m, n in failed.items() if m.rsplit(".", 1)[1] not in NEEDS_TRITON or n.split(".")[0] != "triton"}
    assert not unexpected, f"modules that fail to import without triton: {unexpected}"
    assert {m.rsplit(".", 1)[1] for m in failed} == NEEDS_TRITON    # the list above stays true


def test_the_suite_collects_without_triton():
    r = _run("""
        import pytest
        sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests"]))
    """)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    assert "error" not in r.stdout.splitlines()[-1].lower(), tail
