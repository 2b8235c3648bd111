"""Confinement: every file an artifact or a source folder names must lie inside that folder.

Names come from files written by strangers (a manifest, a weight index, modules.json), so a
name is checked lexically (no absolute path, no `..`) and then resolved, following symlinks,
against the folder's own resolved path. The one exception is a Hugging Face cache snapshot,
whose files are links `snapshots/<rev>/name -> ../../blobs/<hash>`: they may resolve into that
cache's `blobs` folder, and nowhere else.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from edgelm.errors import ArtifactError, EdgelmError, UnsupportedModelError

MAX_SOURCE_JSON_BYTES = 64 << 20  # config, index and tokenizer_config files are far smaller


def _lexically_inside(name: str) -> bool:
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts:
        return False
    return bool(posix.parts) and posix.parts != (".",)


def hf_cache_blobs(folder: Path) -> Path | None:
    """The `blobs` folder of the Hugging Face cache repo holding `folder`, if it is a snapshot."""
    snapshots = folder.parent
    if snapshots.name == "snapshots" and (snapshots.parent / "blobs").is_dir():
        return (snapshots.parent / "blobs").resolve()
    return None


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confined(folder: str | Path, name: Any, what: str, *, error: type[EdgelmError] = ArtifactError,
             hf_cache: bool = False) -> Path:
    """`folder / name`, or `error` naming the file when it would lie outside `folder`.

    `hf_cache` allows a source folder's links into its Hugging Face cache's blobs (see above).
    The path returned is the unresolved one inside the folder, so messages name what the user
    sees; it is only returned once its resolved target has been checked.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{folder}: {what} {name!r} is not a file name")
    if not _lexically_inside(name):
        raise error(f"{folder}: {what} {name!r} points outside the folder")
    try:
        root = folder.resolve()
        resolved = (root / name).resolve()
    except (OSError, RuntimeError):  # a symlink loop; RuntimeError before Python 3.13
        raise error(f"{folder / name}: {what} cannot be resolved (a symlink loop?)") from None
    blobs = hf_cache_blobs(root) if hf_cache else None
    if not (_is_within(resolved, root) or (blobs is not None and _is_within(resolved, blobs))):
        raise error(f"{folder / name}: {what} links outside the folder (to {resolved})")
    return folder / name


def read_source_json(folder: str | Path, name: str, what: str | None = None,
                     error: type[EdgelmError] = UnsupportedModelError, expect: type = dict) -> Any:
    """A source folder's JSON file as an object (or `expect`): confined, size-limited, UTF-8; else one line."""
    path = confined(folder, name, what or name, error=error, hf_cache=True)
    return read_json_file(path, what or name, error, MAX_SOURCE_JSON_BYTES, expect)


def bounded_size(path: Path, limit: int, what: str, error: type[EdgelmError] = ArtifactError) -> int:
    """The size of the file at `path`, refused in one line when it cannot be read or passes `limit`
    (checked before a parser holds the whole file in memory)."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise error(f"{path}: cannot read the {what} ({err.strerror or type(err).__name__})") from None
    if size > limit:
        raise error(f"{path}: a {what} of {size} bytes is too large (at most {limit})")
    return size


def read_json_file(path: Path, what: str, error: type[EdgelmError], limit: int, expect: type = dict) -> Any:
    """An already-confined JSON file as `expect`: at most `limit` bytes, UTF-8; else `error`, one line."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise error(f"{path}: {size} bytes is too large for a {what} (limit {limit})")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as err:
        raise error(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, expect):
        wanted = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise error(f"{path}: not {wanted}, got {type(data).__name__}")
    return data
