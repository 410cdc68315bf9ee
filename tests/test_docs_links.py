"""The docs' references to result files and result pages resolve (no torch; reads text files only).

- every ``results/<path>`` named in README.md, docs/, benchmarks/, scripts/, src/ or tests/ exists under
  docs/results/, and so does every file a page in docs/results/ names by itself (a link or a code span);
- every file in docs/results/ is referenced from docs/RESULTS.md (itself or a folder above it);
- a section of speed.md / attention.md / multigpu.md named in quotes after the page exists, and no reference
  uses the old ``§`` section numbers.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "results"
PAGES = ("speed.md", "attention.md", "multigpu.md")

_RESULT_PATH = re.compile(r"(?<![\w.$/-])(?:docs/)?results/([\w.\-/]*[\w/])")
_LOCAL_NAME = re.compile(r"`([\w.\-]+\.(?:json|txt|md))`|\]\(([\w.\-/]+)\)")
_SECTION_REF = re.compile(r"\b(speed|attention|multigpu)\.md`?\)?,?\s+\"([^\"]+)\"")
_OLD_SECTION = re.compile(r"\b(?:speed|attention|multigpu)\.md`?\)?,?\s*§")


def _text_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for folder, pattern in (("benchmarks", "*"), ("scripts", "*"), ("src", "*.py"), ("tests", "*.py")):
        files += [p for p in sorted((ROOT / folder).rglob(pattern))
                  if p.is_file() and p.suffix in (".py", ".sh", ".md")]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_results_path_exists():
    missing = []
    for path in _text_files():
        for match in _RESULT_PATH.finditer(path.read_text(encoding="utf-8")):
            if not (RESULTS_DIR / match.group(1)).exists():
                missing.append(f"{_rel(path)}: results/{match.group(1)}")
    assert not missing, "references to missing result files:\n" + "\n".join(missing)


def test_result_pages_name_existing_files():
    missing = []
    for page in sorted(RESULTS_DIR.glob("*.md")):  # the pages; a run folder's own report names its run's files
        for match in _LOCAL_NAME.finditer(page.read_text(encoding="utf-8")):
            name = match.group(1) or match.group(2)
            if "://" in name or name.startswith("#"):
                continue
            if not (page.parent / name).exists() and not (ROOT / name).exists():
                missing.append(f"{_rel(page)}: {name}")
    assert not missing, "result pages name missing files:\n" + "\n".join(missing)


def test_every_result_file_is_referenced_from_results_md():
    text = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    unreferenced = []
    for path in sorted(p for p in RESULTS_DIR.rglob("*") if p.is_file()):
        rel = path.relative_to(RESULTS_DIR)
        names = [f"results/{rel.as_posix()}"] + [f"results/{parent.as_posix()}/" for parent in rel.parents
                                                 if parent != Path(".")]
        if not any(name in text for name in names):
            unreferenced.append(rel.as_posix())
    assert not unreferenced, "files in docs/results/ not referenced from docs/RESULTS.md:\n" + "\n".join(unreferenced)


def _headings(page: str) -> set[str]:
    text = (RESULTS_DIR / page).read_text(encoding="utf-8")
    return {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}


def test_named_sections_of_result_pages_exist():
    headings = {page: _headings(page) for page in PAGES}
    bad = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8")
        bad += [f"{_rel(path)}: {m.group(0)}" for m in _OLD_SECTION.finditer(text)]
        for match in _SECTION_REF.finditer(text):
            if match.group(2) not in headings[match.group(1) + ".md"]:
                bad.append(f"{_rel(path)}: {match.group(1)}.md \"{match.group(2)}\"")
    assert not bad, "references to sections that do not exist (or old § numbers):\n" + "\n".join(bad)
