"""`edgelm add`, `edgelm list`, `edgelm rm`: the named model library (edgelm/library.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from edgelm.errors import ArtifactError, EdgelmError, UsageError, first_line
from edgelm.library import (
    HOW_TO_LIST,
    MAX_FIELD,
    MODELS_DIR,
    Entry,
    check_name,
    copy_folder,
    editing,
    library_home,
    name_from_path,
    read_index,
)
from edgelm.safe_text import printable, terminal_json

MAX_LISTED_FILES = 10_000  # a folder's size on disk is summed over at most this many files


# -- add -------------------------------------------------------------------------------------------

def add_model(path: Path, name: str | None, copy: bool, quiet: bool = False) -> Entry:
    """Register the artifact folder or .gguf file at `path` (checked as load() checks it)."""
    path = Path(os.path.abspath(path))
    manifest = describe_source(path)
    name = check_name(name) if name is not None else name_from_path(path)
    _refuse_taken(name, read_index())  # before a long copy; checked again under the lock
    entry = Entry(name=name, path=str(path), copied=copy, added=_now(), **kind_of(manifest))
    if copy:
        entry = _add_copy(entry, path)
    else:
        with editing() as entries:
            _refuse_taken(name, entries)
            entries[name] = entry
    if not quiet:
        how = "copied into the library" if copy else "by reference"
        click.echo(printable(f"added {name}: {entry.family} {entry.format} {entry.quant}, "
                             f"{human_size(size_on_disk(Path(entry.path)))} ({how}: {entry.path})"))
    return entry


def describe_source(path: Path):
    """The manifest (or a bare .gguf's stand-in) of what `add` is given; a one-line error otherwise."""
    from edgelm.runtime import info

    if not path.exists():
        raise ArtifactError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix != ".gguf":
        raise UsageError(f"{path}: add takes an artifact folder (with edgelm.json) or a .gguf file")
    return info(path)


def kind_of(manifest) -> dict[str, str]:
    """The family, format, quant and task an entry shows, cut to what the index accepts: a
    manifest's text is unbounded, and one over-long field would make the whole index unreadable."""
    return {key: getattr(manifest, key)[:MAX_FIELD] for key in ("family", "format", "quant", "task")}


def _refuse_taken(name: str, entries: dict[str, Entry]) -> None:
    taken = next((e for n, e in entries.items() if n.lower() == name.lower()), None)
    if taken is not None:
        raise UsageError(f"the library already has a model named {taken.name!r} ({taken.path}); "
                         f"give another with --name, or `edgelm rm {taken.name}` first")


def _add_copy(entry: Entry, source: Path) -> Entry:
    return _add_owned(entry, lambda staged: _copy_files(source, staged))


def _add_owned(entry: Entry, fill: Callable[[Path], str | None]) -> Entry:
    """An entry whose files the library owns: `fill` writes them into a hidden staging folder
    (returning the .gguf's file name, or None for a folder), which is renamed to models/NAME
    under the lock. An interrupted add leaves no entry and no folder behind."""
    models = library_home() / MODELS_DIR
    try:
        models.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=models))
    except OSError as err:
        raise ArtifactError(f"{models}: cannot create the library's models folder ({err.strerror or err})") from None
    try:
        inside = fill(staging / "model")
        final = copy_folder(entry.name)
        with editing() as entries:
            _refuse_taken(entry.name, entries)
            if final.is_symlink() or final.exists():  # left by an interrupted rm: no entry owns it
                _delete_tree(final)
            os.replace(staging / "model", final)
            entry = replace(entry, path=str(final / inside if inside else final), copied=True)
            entries[entry.name] = entry
        return entry
    finally:
        _delete_tree(staging)


def library_name_for(out: Path, name: str | None) -> str:
    """The name an output of `export --add` or `train --add` will get, checked free now, so a
    bad or taken name fails before the work rather than after it."""
    name = check_name(name) if name is not None else name_from_path(Path(out))
    _refuse_taken(name, read_index())
    return name


def export_into_library(source: Path, name: str, progress: Callable | None = None) -> Entry:
    """Export a trained folder with its family's defaults, validated, into the library as `name`."""
    from edgelm.export import export
    from edgelm.export.options import ExportOptions

    def fill(target: Path) -> None:
        manifest = export(source, target, ExportOptions(progress=progress))
        for check in manifest.validation:
            click.echo(f"  {check.describe()}")

    placeholder = Entry(name=name, path=str(copy_folder(name)), copied=True, added=_now())
    entry = _add_owned(placeholder, fill)
    manifest = describe_source(Path(entry.path))
    entry = _set_kind(name, manifest)
    click.echo(printable(f"added {name}: {entry.family} {entry.format} {entry.quant}, "
                         f"{human_size(size_on_disk(Path(entry.path)))} (exported into the library: {entry.path})"))
    return entry


def _set_kind(name: str, manifest) -> Entry:
    with editing() as entries:
        entry = replace(entries[name], **kind_of(manifest))
        entries[name] = entry
    return entry


def _copy_files(source: Path, target: Path) -> str | None:
    """Copy an artifact's listed files (or the .gguf file) into `target`; the file name for a
    .gguf, None for a folder. The copy is checked against the manifest's hashes before use."""
    from edgelm.artifact import MANIFEST_NAME, read_manifest

    try:
        target.mkdir()
        if source.is_file():
            shutil.copyfile(source, target / source.name)
            if (target / source.name).stat().st_size != source.stat().st_size:
                raise ArtifactError(f"{source}: the copy's size differs from the file's; try again")
            return source.name
        manifest = read_manifest(source)
        for name in [MANIFEST_NAME, *manifest.files]:  # names the manifest check already confined
            shutil.copyfile(source / name, target / name)
    except OSError as err:
        raise ArtifactError(f"{source}: copying into the library failed ({err.strerror or err})") from None
    read_manifest(target, verify=True)
    return None


def _delete_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- list ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """What `list` shows of one entry, read fresh from its files where they still are."""

    entry: Entry
    status: str  # ok | missing | broken
    size_bytes: int | None
    validated: str  # passed | FAILED | skipped | - (a bare .gguf has no validation)
    problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        verified = self.entry.verified
        return {**self.entry.to_dict(), "status": self.status, "missing": self.status == "missing",
                "size_bytes": self.size_bytes, "validated": self.validated, "problem": self.problem or None,
                "verified": None if verified is None else {"passed": verified.passed, "at": verified.at,
                                                           "cpu": verified.cpu}}


def list_models(as_json: bool) -> None:
    entries = read_index()
    rows = [row_for(entries[name]) for name in sorted(entries, key=str.lower)]
    if as_json:
        click.echo(terminal_json({"home": str(library_home()), "models": [r.to_dict() for r in rows]}, indent=2))
        return
    if not rows:
        click.echo(printable(f"the library ({library_home()}) is empty; `edgelm add PATH` registers a model"))
        return
    table = [("NAME", "FAMILY", "FORMAT", "QUANT", "SIZE", "VALIDATED", "VERIFIED", "STATUS")]
    for r in rows:
        size = human_size(r.size_bytes) if r.size_bytes is not None else "-"
        table.append((r.entry.name, r.entry.family, r.entry.format, r.entry.quant, size, r.validated,
                      _verified_text(r.entry), r.status))
    widths = [max(len(printable(line[i])) for line in table) for i in range(len(table[0]))]
    for line in table:
        click.echo("  ".join(printable(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())
    for r in rows:
        if r.status != "ok":
            click.echo(printable(f"{r.entry.name}: {r.problem}"), err=True)


def row_for(entry: Entry) -> Row:
    """The entry as its files are now: missing, broken (the manifest fails its checks) or ok."""
    from edgelm.runtime import info

    path = Path(entry.path)
    if entry.missing:
        return Row(entry, "missing", None, "-", f"{entry.path} is gone (`edgelm rm {entry.name}` removes the entry)")
    size = size_on_disk(path)
    try:
        manifest = info(path)
    except EdgelmError as err:
        return Row(entry, "broken", size, "-", first_line(err))
    fresh = replace(entry, **kind_of(manifest))
    return Row(fresh, "ok", size, _validated_text(manifest))


def _validated_text(manifest) -> str:
    if not manifest.created:
        return "-"  # a bare .gguf from elsewhere: nothing edgelm validated
    if manifest.validation_skipped:
        return "skipped"
    if not manifest.validation:
        return "-"  # a bare .gguf, or an artifact exported before validation numbers were kept
    return "passed" if manifest.validation_passed else "FAILED"


def _verified_text(entry: Entry) -> str:
    if entry.verified is None:
        return "-"
    return f"{'passed' if entry.verified.passed else 'FAILED'} {entry.verified.at[:10]}"


def size_on_disk(path: Path) -> int:
    """Bytes of a .gguf file, or of the files directly inside an artifact folder."""
    try:
        if path.is_file():
            return path.stat().st_size
        total = 0
        with os.scandir(path) as files:
            for count, item in enumerate(files):
                if count >= MAX_LISTED_FILES:
                    break
                if item.is_file(follow_symlinks=False):
                    total += item.stat(follow_symlinks=False).st_size
        return total
    except OSError:
        return 0


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


# -- rm --------------------------------------------------------------------------------------------

def remove_model(name: str) -> None:
    """Drop the entry; delete files only where the library copied them (models/NAME)."""
    check_name(name)
    with editing() as entries:
        entry = entries.pop(name, None)
        if entry is None:
            raise UsageError(f"no model named {name!r} in the library; {HOW_TO_LIST}")
    if not entry.copied:
        click.echo(printable(f"removed {name} (its files at {entry.path} were added by reference and are kept)"))
        return
    folder = copy_folder(name)  # from the checked name, never from the index's path
    try:
        if folder.is_symlink() or folder.exists():
            _delete_tree(folder)
    except OSError as err:
        raise ArtifactError(f"removed {name} from the library, but deleting its copy {folder} failed "
                            f"({err.strerror or err}); delete it by hand") from None
    click.echo(printable(f"removed {name} and deleted its copy at {folder}"))
