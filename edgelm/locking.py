"""Lock files released however the process ends: one export at a time per output folder, and one
writer at a time of the model library's index."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from edgelm.errors import EdgelmError, ExportError

POLL_S = 0.05


@contextlib.contextmanager
def export_lock(out: Path) -> Iterator[Path]:
    """Hold `.NAME.lock` next to `out` for one export; a second export to `out` fails at once."""
    path = out.parent / f".{out.name}.lock"
    with file_lock(path, f"{out}: another export to it is running (lock {path})", ExportError, what=out):
        yield path


@contextlib.contextmanager
def file_lock(path: Path, busy: str, error: type[EdgelmError], *, what: object = None,
              wait_s: float = 0.0) -> Iterator[Path]:
    """Hold the lock file `path`; if another process holds it, wait up to `wait_s` seconds, then
    raise `error(busy)`.

    flock is released by the kernel however the process ends, so a killed holder never leaves
    a lock that blocks the next one. After locking, the file must still be the one at the path
    (the previous holder unlinks it on release), else the lock is retaken on the new file.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as err:
            raise error(f"{what or path}: cannot create the lock file {path} ({err.strerror})") from None
        try:
            locked = _try_lock(fd)
            if locked and os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if not locked:
            if time.monotonic() >= deadline:
                raise error(busy)
            time.sleep(POLL_S)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # closing releases the lock


def _try_lock(fd: int) -> bool:
    """Take the lock without blocking; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: msvcrt locks a byte range of the open file
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
