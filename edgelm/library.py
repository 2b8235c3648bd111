"""The model library: names for artifact folders and bare .gguf files, kept in one index file.

The library lives in the platform's data folder (platformdirs), or in `EDGELM_HOME` when set:
`library.json` is the index, `models/NAME/` holds what `edgelm add --copy` copied. The index is
rewritten whole (a temporary file, then os.replace) under a lock file, so concurrent `add`s
wait for each other and a reader never sees half an index. The index is untrusted input like
every file edgelm reads: it is size-bounded and checked field by field, and any problem is one
line naming the file. The files a copied entry owns are found from its checked name, never from
a path the index holds, so a hand-edited index cannot make `rm` delete anything else.

Stdlib only (platformdirs is imported when the home is first needed): `runtime.load` resolves
names through `resolve_model` here, so nothing in this module may import the runtime.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgelm.errors import ArtifactError, UsageError
from edgelm.locking import file_lock
from edgelm.safe_text import terminal_json

INDEX_FILE = "library.json"
MODELS_DIR = "models"
INDEX_VERSION = 1
MAX_INDEX_BYTES = 4 << 20
MAX_ENTRIES = 10_000
MAX_NAME = 64
MAX_PATH = 4096
MAX_FIELD = 200
LOCK_WAIT_S = 30.0
# letters, digits and . _ - ; starting with a letter or digit, so a name is never a flag or a hidden file
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# names Windows reserves for devices, in any case and with any extension: unusable as folder names
WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
HOW_TO_LIST = "`edgelm list` shows the names"


@dataclass(frozen=True)
class Verification:
    """The last `edgelm verify` run on this machine: passed or not, when, on which CPU."""

    passed: bool
    at: str
    cpu: str = ""


@dataclass(frozen=True)
class Entry:
    """One named model. `path` is absolute; `copied` entries own `models/NAME/` in the library."""

    name: str
    path: str
    copied: bool = False
    family: str = ""
    format: str = ""
    quant: str = ""
    task: str = ""
    added: str = ""
    verified: Verification | None = None

    @property
    def missing(self) -> bool:
        return not _exists(Path(self.path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- names ---------------------------------------------------------------------------------------

def check_name(name: object) -> str:
    """`name` if it can name a library model, else a UsageError saying why (one line)."""
    if not isinstance(name, str):
        raise UsageError(f"a model name must be text, got {type(name).__name__}")
    shown = repr(name[:MAX_NAME + 8])
    if not name:
        raise UsageError("a model name cannot be empty")
    if len(name) > MAX_NAME:
        raise UsageError(f"model name {shown}... is longer than {MAX_NAME} characters")
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"model name {shown} may hold only letters, digits, '.', '_' and '-', starting with "
                         "a letter or digit (no path separators, spaces or control characters)")
    if name.split(".")[0].lower() in WINDOWS_DEVICES:
        raise UsageError(f"model name {shown} is a device name on Windows; choose another")
    return name


def is_valid_name(name: object) -> bool:
    try:
        check_name(name)
    except UsageError:
        return False
    return True


def name_from_path(path: Path) -> str:
    """The name a model gets by default: its folder's name, or a .gguf file's stem, with every
    character a name cannot hold replaced by '-'."""
    path = Path(os.path.abspath(path))
    stem = path.stem if path.suffix == ".gguf" else path.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-")[:MAX_NAME].rstrip(".-_") or "model"
    return name if is_valid_name(name) else f"model-{name}"[:MAX_NAME]


# -- where the library lives ---------------------------------------------------------------------

def library_home() -> Path:
    """`EDGELM_HOME` when set, else the platform's data folder for edgelm (not created here)."""
    home = os.environ.get("EDGELM_HOME")
    if home:
        return Path(os.path.abspath(os.path.expanduser(home)))
    import platformdirs

    return Path(platformdirs.user_data_path("edgelm", appauthor=False))


def index_path(home: Path | None = None) -> Path:
    return (home or library_home()) / INDEX_FILE


def copy_folder(name: str, home: Path | None = None) -> Path:
    """The folder a copied entry owns, derived from its (checked) name alone."""
    return (home or library_home()) / MODELS_DIR / check_name(name)


# -- the index: reading (untrusted) and writing (atomic) ------------------------------------------

def parse_index(data: bytes, where: Path) -> dict[str, Entry]:
    """The entries an index file holds; any problem is an ArtifactError naming `where`."""
    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{where}: {why}; fix the file or remove it to start an empty library")

    if len(data) > MAX_INDEX_BYTES:
        raise bad(f"the library index is larger than {MAX_INDEX_BYTES} bytes")
    try:
        document = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise bad("the library index is not UTF-8") from None
    except (ValueError, RecursionError) as err:
        raise bad(f"the library index is not valid JSON ({str(err)[:100]})") from None
    if not isinstance(document, dict) or document.get("version") != INDEX_VERSION:
        raise bad(f"the library index must be an object with \"version\": {INDEX_VERSION}")
    models = document.get("models")
    if not isinstance(models, dict):
        raise bad("the library index's \"models\" must be an object of name -> entry")
    if len(models) > MAX_ENTRIES:
        raise bad(f"the library index holds more than {MAX_ENTRIES} models")
    entries: dict[str, Entry] = {}
    seen: set[str] = set()
    for name, raw in models.items():
        try:
            entry = _entry_from(name, raw)
        except UsageError as err:
            raise bad(f"model {str(name)[:MAX_NAME]!r}: {err}") from None
        if name.lower() in seen:
            raise bad(f"two models are named {name!r} (names are compared without case)")
        seen.add(name.lower())
        entries[name] = entry
    return entries


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key appears twice in one object")
    return dict(pairs)


def _entry_from(name: Any, raw: Any) -> Entry:
    check_name(name)
    if not isinstance(raw, dict):
        raise UsageError("an entry must be an object")
    path = _text(raw.get("path"), "path", MAX_PATH)
    if not path or not os.path.isabs(path) or "\x00" in path:
        raise UsageError("path must be an absolute path")
    copied = raw.get("copied", False)
    if not isinstance(copied, bool):
        raise UsageError("copied must be true or false")
    fields = {key: _text(raw.get(key, ""), key, MAX_FIELD) for key in ("family", "format", "quant", "task", "added")}
    return Entry(name=name, path=path, copied=copied, verified=_verification(raw.get("verified")), **fields)


def _verification(raw: Any) -> Verification | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("passed"), bool):
        raise UsageError("verified must be null or an object with passed true or false")
    return Verification(passed=raw["passed"], at=_text(raw.get("at", ""), "verified.at", MAX_FIELD),
                        cpu=_text(raw.get("cpu", ""), "verified.cpu", MAX_FIELD))


def _text(value: Any, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{field} must be text")
    if len(value) > limit:
        raise UsageError(f"{field} is longer than {limit} characters")
    return value


def dump_index(entries: dict[str, Entry]) -> bytes:
    models = {name: {k: v for k, v in entry.to_dict().items() if k != "name"} for name, entry in entries.items()}
    # lone surrogates (a file name's undecodable bytes, as os gives them) cannot be UTF-8: written
    # as \u escapes, they read back as the same path
    return (terminal_json({"version": INDEX_VERSION, "models": models}, indent=2) + "\n").encode()


def read_index(home: Path | None = None) -> dict[str, Entry]:
    """Every entry; an empty library when there is no index yet."""
    path = index_path(home)
    try:  # non-blocking open: a FIFO put in the index's place must not hang every command
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ArtifactError(f"{path}: cannot read the library index ({err.strerror or err})") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ArtifactError(f"{path}: the library index is not a regular file; remove it")
        try:
            data = file.read(MAX_INDEX_BYTES + 1)  # one byte past the bound is enough to refuse it
        except OSError as err:
            raise ArtifactError(f"{path}: cannot read the library index ({err.strerror or err})") from None
    return parse_index(data, path)


def _write_index(home: Path, entries: dict[str, Entry]) -> None:
    path = index_path(home)
    fd, temp = tempfile.mkstemp(prefix=f".{INDEX_FILE}.", suffix=".tmp", dir=home)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(dump_index(entries))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def editing(home: Path | None = None) -> Iterator[dict[str, Entry]]:
    """The entries to change in place; written back atomically if the block ends without error.
    One writer at a time: the others wait up to LOCK_WAIT_S for the lock."""
    home = home or library_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArtifactError(f"{home}: cannot create the library folder ({err.strerror or err})") from None
    lock = home / f".{INDEX_FILE}.lock"
    busy = f"{index_path(home)}: another edgelm has held the library's lock for {LOCK_WAIT_S:.0f}s (lock {lock})"
    with file_lock(lock, busy, ArtifactError, what=index_path(home), wait_s=LOCK_WAIT_S):
        entries = read_index(home)
        yield entries
        _write_index(home, entries)


# -- what the commands ask --------------------------------------------------------------------------

def get_entry(name: str, home: Path | None = None) -> Entry:
    entry = read_index(home).get(check_name(name))
    if entry is None:
        raise UsageError(f"no model named {name!r} in the library; {HOW_TO_LIST}")
    return entry


def resolve_model(ref: str | os.PathLike) -> Path:
    """The path a command or load() should open for `ref`: a path that exists wins; else a
    library name; else, for text that cannot be a path elsewhere (no separator), one line saying
    it is neither. A path with a separator that does not exist is returned as is, so the loader
    names it in its own words."""
    return named(ref)[1]


def named(ref: str | os.PathLike) -> tuple[str | None, Path]:
    """(library name, path) for `ref`, as resolve_model finds it; the name is None for a path."""
    path = Path(ref)
    if _exists(path):
        return None, path
    text = os.fspath(ref)
    if not text or any(sep and sep in text for sep in (os.sep, os.altsep, "/")):
        return None, path
    entry = read_index().get(text) if is_valid_name(text) else None
    if entry is None:
        raise UsageError(f"{text!r} is neither a file or folder nor a model in the library; {HOW_TO_LIST}")
    if entry.missing:
        raise ArtifactError(f"library model {text!r} is missing: {entry.path} is gone "
                            f"(`edgelm rm {text}` removes the entry)")
    return text, Path(entry.path)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a NUL byte, a name too long for the file system
        return False


def record_verification(path: Path, passed: bool, at: str, cpu: str, home: Path | None = None) -> list[str]:
    """Store a verify result in every entry whose files are at `path`; the names updated."""
    target = os.path.realpath(path)
    if not any(os.path.realpath(e.path) == target for e in read_index(home).values()):
        return []  # no entry: leave the library (and whether it exists at all) untouched
    updated = []
    with editing(home) as entries:
        for name, entry in list(entries.items()):
            if os.path.realpath(entry.path) == target:
                entries[name] = replace(entry, verified=Verification(passed=passed, at=at, cpu=cpu[:MAX_FIELD]))
                updated.append(name)
    return updated
