"""One export at a time per output folder: a lock file next to it, released however the process ends."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from edgelm.errors import ExportError


@contextlib.contextmanager
def export_lock(out: Path) -> Iterator[Path]:
    """Hold `.NAME.lock` next to `out` for one export; a second export to `out` fails at once.

    flock is released by the kernel however the process ends, so a killed export never leaves
    a lock that blocks the next one. After locking, the file must still be the one at the path
    (the previous holder unlinks it on release), else the lock is retaken on the new file.
    """
    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as err:
            raise ExportError(f"{out}: cannot create the lock file {path} ({err.strerror})") from None
        try:
            _try_lock(fd, out, path)
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # closing releases the lock


def _try_lock(fd: int, out: Path, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: msvcrt locks a byte range of the open file
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise ExportError(f"{out}: another export to it is running (lock {path})") from None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ExportError(f"{out}: another export to it is running (lock {path})") from None
