"""The README's two commands, verbatim, on a copy of this checkout with a fresh .venv: the set-up
command (install + demo) and then the test command, which must end on pytest's summary line.

The slow test installs torch and the package from scratch (pip's cache helps) and runs the whole
suite once more inside the new environment, where it skips itself (DVDQUANT_README_TEST is set).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NESTED = "DVDQUANT_README_TEST"


def readme_commands() -> list[str]:
    """The shell commands of the README's "The two commands" section, comments stripped, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    cmds = [line.split("#", 1)[0].strip() for b in blocks for line in b.splitlines()]
    return [c for c in cmds if c]


def test_readme_has_two_commands_and_ci_runs_them():
    cmds = readme_commands()
    assert cmds == ["bash scripts/quickstart.sh", ".venv/bin/python -m pytest -q"], cmds
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    positions = [ci.index(c) for c in cmds]                      # verbatim, in order
    assert positions == sorted(positions)


def _checkout_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get(NESTED)), reason="already inside the README-commands run")
@pytest.mark.skipif(os.environ.get("CI") == "true", reason="CI's .ci/run is these two commands, verbatim, on a fresh "
                    "clone (test_readme_has_two_commands_and_ci_runs_them holds it to the README)")
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_readme_commands_on_a_fresh_venv(tmp_path):
    repo = tmp_path / "repo"
    _checkout_copy(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env[NESTED] = "1"
    for cmd in readme_commands():
        t0 = time.perf_counter()
        r = subprocess.run(cmd, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=3600)
        print(f"{cmd}: rc {r.returncode} in {time.perf_counter() - t0:.0f} s")
        out = r.stdout.rstrip().splitlines()
        assert r.returncode == 0, f"{cmd} failed:\n" + "\n".join((r.stdout + r.stderr).splitlines()[-40:])
    assert (repo / "dvdquant_demo" / "report.txt").is_file()
    last = out[-1] if out else ""
    assert re.fullmatch(r"\d+ passed.* in [\d.]+s.*", last), f"the test command ends on {last!r}"
    assert "leaked" not in r.stdout + r.stderr
