"""Atomic file writes: a reader never sees a half-written file, and a killed writer leaves nothing."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it replaces ``path`` in one step."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a new file should follow the umask
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` so that it appears whole or not at all.

    On Linux the bytes go to an unnamed file (``O_TMPFILE``) in the target's folder that gets a name
    only once complete, so a process killed mid-write (even by SIGKILL) leaves no temporary file
    behind. Elsewhere a named temporary file is used (removed on any exception). The new file gets
    the umask's permissions, as ``open`` would give it.
    """
    target = Path(path)
    folder = target.parent
    mode = 0o666 & ~_umask()
    fd = _unnamed_file(folder, mode)
    if fd is None:
        with atomic_path(target) as tmp, open(tmp, "wb") as file:
            write(file)
        return
    with os.fdopen(fd, "w+b") as file:
        write(file)
        file.flush()
        os.fchmod(file.fileno(), mode)
        # Named for an instant only (link, then rename over the target): the data is already written.
        tmp = folder / f".{target.name}.{os.getpid()}.{id(file):x}.tmp"
        if not _link_fd(file.fileno(), tmp):  # no /proc or linkat: copy into a named temporary
            file.seek(0)
            with atomic_path(target) as named, open(named, "wb") as out:
                shutil.copyfileobj(file, out)
            return
    try:
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _unnamed_file(folder: Path, mode: int) -> int | None:
    """An ``O_TMPFILE`` descriptor in ``folder``, or None where the OS or file system has none."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return None
    try:
        return os.open(folder, flag | os.O_RDWR, mode)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL) or (
            err.errno == errno.ENOENT and folder.is_dir()
        ):
            return None
        raise


def _link_fd(fd: int, path: Path) -> bool:
    """``linkat(AT_FDCWD, "/proc/self/fd/N", AT_FDCWD, path, AT_SYMLINK_FOLLOW)``.

    ``os.link`` cannot do this: it calls ``link()``, which links the /proc symlink itself (EXDEV).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, at_symlink_follow = -100, 0x400
        done = libc.linkat(
            at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd, os.fsencode(path), at_symlink_follow
        )
    except (OSError, AttributeError):
        return False
    return done == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
