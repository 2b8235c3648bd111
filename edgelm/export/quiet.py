"""Quieting a library's logger for one block, then putting its level back.

Exporters call libraries (optimum, onnxruntime's quantizer, gguf) that log warnings meant for
their own developers. edgelm may be embedded in an app with its own logging set up, so it never
sets a level for good, and never touches the root logger: it raises the named loggers' levels
for the block and restores them afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Loggers `names` (never "" for the root) below `level` are silenced inside the block."""
    if any(not name for name in names):
        raise ValueError("the root logger belongs to the application; name the library's logger")
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, old in zip(loggers, saved):
            logger.setLevel(old)


class _FromPackage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or self.fragment not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def quiet_root_calls(package_path: str) -> Iterator[None]:
    """Drop warnings that code under `package_path` logs straight on the root logger
    (`logging.warning(...)`), for the block only.

    The root logger's level is the application's and stays as it is. A filter on it holds back
    only those records; while it has no handler, a NullHandler stands in, because a root-level
    call would otherwise install a console handler for good (logging.basicConfig)."""
    root = logging.getLogger()
    holdback = _FromPackage(package_path)
    stand_in = logging.NullHandler() if not root.handlers else None
    root.addFilter(holdback)
    if stand_in is not None:
        root.addHandler(stand_in)
    try:
        yield
    finally:
        root.removeFilter(holdback)
        if stand_in is not None:
            root.removeHandler(stand_in)
