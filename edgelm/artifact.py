"""The artifact contract: a folder of model and tokenizer files plus the manifest `edgelm.json`.

Writes are atomic (built in a hidden sibling folder, flushed, then renamed into place), and
loads check every file against the manifest before any backend opens it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm._version import __version__
from edgelm.contract import (
    GenerationSection,
    MachineSection,
    ModelSection,
    SourceSection,
    TokenizerSection,
    check_task_fields,
    key_text,
    model_class,
    parse_section,
    show_value,
    spec,
    upgrade_v1,
)
from edgelm.errors import ArtifactError, ExportError
from edgelm.locking import export_lock
from edgelm.machine import machine_facts
from edgelm.paths import confined, read_json_file

MANIFEST_NAME = "edgelm.json"
MAX_MANIFEST_BYTES = 16 << 20  # chat templates and fallback lists included, real ones are far smaller
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # schema 1 is migrated on reading (edgelm/contract.py: upgrade_v1)
PARTIAL_MARK = ".partial-"


@dataclass
class Check:
    """One validation number: what was measured, the bound it had to meet, and whether it did."""

    name: str
    value: float | None
    threshold: float | None
    passed: bool
    note: str = ""

    @classmethod
    def at_most(cls, name: str, value: float, threshold: float) -> Check:
        return cls(name, float(value), threshold, bool(value <= threshold))

    @classmethod
    def at_least(cls, name: str, value: float, threshold: float) -> Check:
        return cls(name, float(value), threshold, bool(value >= threshold))

    def describe(self) -> str:
        """One line for people: mark, name, value and the bound it had to meet."""
        bound = f" (threshold {self.threshold:g})" if self.threshold is not None else ""
        value = "n/a" if self.value is None else f"{self.value:.6g}"
        return f"{'ok  ' if self.passed else 'FAIL'} {self.name} = {value}{bound}"

    @classmethod
    def measured(cls, name: str, value: float, note: str = "reported, no threshold") -> Check:
        return cls(name, float(value), None, True, note)


SECTIONS = ("tokenizer", "generation", "model", "source")


@dataclass
class Manifest:
    """`edgelm.json`: what an artifact is, how to run it, and how it was proven.

    The family sections are frozen, typed dataclasses (edgelm/contract.py); given as dicts (in
    schema 1's or 2's shape) they are checked and converted, so a wrong field fails here.
    """

    family: str
    task: str
    format: str  # "onnx" or "gguf"
    quant: str
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    source: SourceSection = field(default_factory=SourceSection)
    validation: list[Check] = field(default_factory=list)
    validation_skipped: bool = False
    model: ModelSection | None = None  # None: an empty section of the family's model class
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    created: str = ""
    machine: MachineSection | None = None  # the exporting machine; None in artifacts made before it was recorded
    validation_reference: str | None = None  # the listed file holding validation's probes and torch's outputs
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if any(isinstance(getattr(self, name), dict) for name in SECTIONS):
            data = upgrade_v1({"family": self.family, "format": self.format,
                               **{name: _as_dict(getattr(self, name)) for name in SECTIONS}})
            self._set_sections(data, "manifest", required=False)
        if self.model is None:
            self.model = model_class(self.family, self.format)()

    def _set_sections(self, data: dict[str, Any], where: str, required: bool) -> None:
        classes = {"tokenizer": TokenizerSection, "generation": GenerationSection, "source": SourceSection,
                   "model": model_class(self.family, self.format)}
        for name, cls in classes.items():
            setattr(self, name, parse_section(cls, data.get(name, {}), name, where, required=required))

    @property
    def validation_passed(self) -> bool:
        return not self.validation_skipped and all(c.passed for c in self.validation)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["validation_passed"] = self.validation_passed
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        """A manifest from its JSON object (schema 1 or 2), every field checked; ArtifactError naming it."""
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise ArtifactError(f"{where}: unknown schema_version {show_value(version)} (this edgelm reads "
                                f"{', '.join(map(str, READABLE_VERSIONS))})")
        if version == 1:
            data = upgrade_v1(data)
        top = parse_section(_TopLevel, data, "", where)
        checks = [parse_section(Check, c, f"validation[{i}]", where) for i, c in enumerate(top.validation)]
        files = {name: dataclasses.asdict(parse_section(FileEntry, meta, f"files.{key_text(name)}", where))
                 for name, meta in top.files.items()}
        manifest = cls(family=top.family, task=top.task, format=top.format, quant=top.quant,
                       validation=checks, validation_skipped=top.validation_skipped, files=files,
                       versions=dict(top.versions), created=top.created, schema_version=SCHEMA_VERSION,
                       validation_reference=top.validation_reference)
        if top.machine is not None:
            manifest.machine = parse_section(MachineSection, top.machine, "machine", where)
        manifest._set_sections(data, where, required=True)
        check_task_fields(manifest.task, manifest.tokenizer, manifest.model, where)
        return manifest


@dataclass(frozen=True)
class _TopLevel:
    """The manifest's own fields, checked like the sections' (lists and objects parsed later)."""

    family: str = spec(required=True)
    task: str = spec(required=True)
    format: str = spec(required=True)
    quant: str = spec(required=True)
    validation: tuple[Any, ...] = ()
    validation_skipped: bool = False
    files: dict[str, Any] = spec(factory=dict)
    versions: dict[str, str | None] = spec(factory=dict)
    created: str = ""
    machine: dict[str, Any] | None = None
    validation_reference: str | None = None


@dataclass(frozen=True)
class FileEntry:
    size: int = spec(required=True)
    sha256: str = spec(required=True)


def _as_dict(section: Any) -> Any:
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def runtime_versions() -> dict[str, str | None]:
    """Versions of edgelm and of the two backends, as far as they are installed."""
    from importlib import metadata

    def version_of(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "edgelm": __version__,
        "onnxruntime": version_of("onnxruntime"),
        "llama_cpp_python": version_of("llama-cpp-python"),
    }


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    with contextlib.suppress(OSError):  # directories cannot be fsynced on every platform
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_replaceable(out: Path) -> None:
    """Replace only what edgelm owns: an empty folder, or an artifact holding only its own files."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    manifest = out / MANIFEST_NAME
    if not manifest.is_file():
        raise ExportError(f"{out} exists, is not empty and is not an edgelm artifact; refusing to replace it")
    listed = _listed_files(manifest)
    if listed is None:
        raise ExportError(f"{manifest}: unreadable manifest; refusing to replace {out}")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in listed and p.name != MANIFEST_NAME)
    if foreign:
        raise ExportError(f"{out / foreign[0]}: not a file of the artifact it sits in; refusing to replace {out}")


def _listed_files(manifest: Path) -> set[str] | None:
    """The file names an existing manifest lists, or None when it cannot be read as one."""
    try:
        data = read_json_file(manifest, "manifest", ArtifactError, MAX_MANIFEST_BYTES)
    except ArtifactError:
        return None
    files = data.get("files")
    return set(files) if isinstance(files, dict) else None


def _remove_stale_partials(out: Path) -> None:
    """Earlier runs killed hard (SIGKILL, power loss) leave hidden partial folders; clear them."""
    for stale in out.parent.glob(f".{out.name}{PARTIAL_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def write_artifact(out: str | Path, manifest: Manifest) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success record files, write the manifest, swap it in.

    Any exception (KeyboardInterrupt and SystemExit included) removes the temporary folder, so
    `out` is either the previous complete artifact, or absent, never half-written. Concurrent
    writes to one `out` are refused (export_lock), and `out` is only replaced if it holds
    nothing but an artifact's own files.
    """
    out = Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"{out.parent}: cannot create the output's folder ({err.strerror})") from None
    with export_lock(out):
        _check_replaceable(out)
        _remove_stale_partials(out)
        tmp = out.parent / f".{out.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
        try:  # mkdir inside: a signal handled as mkdir returns must still find the cleanup below
            tmp.mkdir()
            yield tmp
            _seal(tmp, manifest)
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _seal(tmp: Path, manifest: Manifest) -> None:
    """List every file with its size and hash, write the manifest, flush everything to disk."""
    entries = sorted(tmp.iterdir())
    strays = [p.name for p in entries if not p.is_file() or p.is_symlink()]
    if strays:  # an artifact is flat regular files; anything else is an exporter bug
        raise ExportError(f"{tmp}: {strays[0]} is not a regular file; an artifact holds files only")
    manifest.files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
                      for p in entries if p.name != MANIFEST_NAME}
    manifest.versions = {**runtime_versions(), **manifest.versions}
    if manifest.machine is None:
        manifest.machine = MachineSection(**machine_facts())
    manifest.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest.schema_version = SCHEMA_VERSION
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    _fsync_tree(tmp)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}{PARTIAL_MARK}old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def read_manifest(folder: str | Path, verify: bool = False) -> Manifest:
    """Read and check an artifact folder; raise ArtifactError naming the first problem found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact" if not folder.exists() else f"{folder}: not a folder")
    path = confined(folder, MANIFEST_NAME, "manifest")
    if not path.is_file():
        raise ArtifactError(f"{folder}: not an edgelm artifact (no {MANIFEST_NAME})")
    manifest = Manifest.from_dict(read_json_file(path, "manifest", ArtifactError, MAX_MANIFEST_BYTES), where=str(path))
    _check_files(folder, manifest, verify)
    return manifest


def _check_files(folder: Path, manifest: Manifest, verify: bool) -> None:
    where = folder / MANIFEST_NAME
    for name, meta in manifest.files.items():
        if name == MANIFEST_NAME or Path(name).name != name or "\\" in name:
            raise ArtifactError(f"{folder}: manifest names a file outside the artifact: {name!r}")
        path = confined(folder, name, "file listed in the manifest")
        if not path.is_file():
            raise ArtifactError(f"{path}: file listed in the manifest is missing")
        size = path.stat().st_size
        if size != meta["size"]:
            raise ArtifactError(f"{path}: size {size} does not match the manifest ({meta['size']})")
        if verify and sha256_of(path) != meta["sha256"]:
            raise ArtifactError(f"{path}: sha256 does not match the manifest")
    named = [("model.file", manifest.model.file), ("tokenizer.file", manifest.tokenizer.file)]
    if manifest.validation_reference is not None:
        named.append(("validation_reference", manifest.validation_reference))
    for field_name, name in named:
        if name not in manifest.files:
            raise ArtifactError(f"{where}: {field_name} {show_value(name)} is not among the files it lists")


def staged(manifest: Manifest, tmp: Path) -> Manifest:
    """A copy of a manifest being written that lists the files so far, so validation can load them."""
    files = {p.name: {"size": p.stat().st_size, "sha256": ""} for p in Path(tmp).iterdir() if p.is_file()}
    return dataclasses.replace(manifest, files=files)


def artifact_file(folder: str | Path, manifest: Manifest, name: str | None, what: str) -> Path:
    """The path of a file the runtime is about to open: listed in the manifest and inside the folder.

    A bare .gguf's stand-in manifest lists no files; its one file was named by the user.
    """
    if manifest.source.bare_gguf and isinstance(name, str) and Path(name).name == name:
        return Path(folder) / name  # the user named this very file (it may be a link into a cache)
    if name not in manifest.files:
        raise ArtifactError(f"{folder}: {what} {show_value(name)} is not a file the manifest lists")
    return confined(folder, name, what)
