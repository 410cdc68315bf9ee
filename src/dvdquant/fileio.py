"""Output paths: checked before any work starts, written atomically, removed when a command fails.

* :func:`check_output_file` / :func:`check_output_dir` raise :class:`DVDQuantError` with one
  line (wrong extension, a folder where a file is needed or the reverse, a folder that cannot
  be written) so that a command fails before it computes anything.
* :func:`atomic_path` yields a temporary name in the destination's folder; the file written
  there replaces the destination (``os.replace``) only when the block completes, with the mode a
  plain ``open`` gives (0666 minus the umask, not ``mkstemp``'s 0600). On any exception,
  KeyboardInterrupt included, the temporary file is removed and the destination is untouched.
* :func:`output_dir` creates a missing folder (and missing parents) and removes what it created
  if the block does not complete.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from .errors import DVDQuantError


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _create_exclusive(path: Path) -> None:
    """Create an empty file that did not exist; the mode is 0666 minus the umask, as ``open`` gives."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


def check_writable_folder(folder, what: str) -> None:
    """``folder`` (or, while missing, its nearest existing ancestor) is a folder we can create files in."""
    base = _nearest_existing(Path(folder))
    if not base.is_dir():
        raise DVDQuantError(f"{what}: {base} is a file, not a folder")
    probe = base / f".dvdquant-probe-{secrets.token_hex(4)}"
    try:
        _create_exclusive(probe)
    except OSError as e:
        raise DVDQuantError(f"{what}: cannot write in {base} ({e.strerror})") from None
    probe.unlink()


def check_output_dir(path, what: str = "--out") -> Path:
    """An output folder: not an existing file, and creatable/writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DVDQuantError(f"{what} {path} is an existing file; give a folder")
    check_writable_folder(path, f"{what} {path}")
    return path


def check_output_file(path, suffixes: Sequence[str] = (), what: str = "--out") -> Path:
    """An output file: one of ``suffixes`` (if given), not an existing folder, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise DVDQuantError(f"{what} {path} is an existing folder; give a file name ending in "
                            f"{' or '.join(suffixes) or 'an extension'}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise DVDQuantError(f"{what} {path}: the extension must be one of {', '.join(suffixes)}")
    check_writable_folder(path.parent, f"{what} {path}")
    return path


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path`` (same extension); on success it becomes ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            _create_exclusive(tmp)
            break
        except FileExistsError:
            continue
    mode = tmp.stat().st_mode & 0o777        # what open() gives here; writers that recreate the file
    try:                                      # (safetensors' save_file gives 0600) are set back to it
        yield tmp
        if tmp.stat().st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextlib.contextmanager
def output_dir(path) -> Iterator[Path]:
    """Create ``path`` (and missing parents); remove what was created here if the block fails."""
    path = Path(path)
    top = None
    p = path.absolute()
    while not p.exists() and p != p.parent:
        top, p = p, p.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise
