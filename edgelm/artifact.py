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
from edgelm.errors import ArtifactError, ExportError

MANIFEST_NAME = "edgelm.json"
SCHEMA_VERSION = 1
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


@dataclass
class Manifest:
    family: str
    task: str
    format: str  # "onnx" or "gguf"
    quant: str
    tokenizer: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    validation: list[Check] = field(default_factory=list)
    validation_skipped: bool = False
    model: dict[str, Any] = field(default_factory=dict)  # family-specific facts (graph io, labels...)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def validation_passed(self) -> bool:
        return not self.validation_skipped and all(c.passed for c in self.validation)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["validation_passed"] = self.validation_passed
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data.pop("validation_passed", None)
        known = {f.name for f in dataclasses.fields(cls)}
        checks = [Check(**c) for c in data.pop("validation", [])]
        return cls(validation=checks, **{k: v for k, v in data.items() if k in known})


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
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ExportError(f"{out} exists, is not empty and is not an edgelm artifact; refusing to replace it")


def _remove_stale_partials(out: Path) -> None:
    """Earlier runs killed hard (SIGKILL, power loss) leave hidden partial folders; clear them."""
    for stale in out.parent.glob(f".{out.name}{PARTIAL_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def write_artifact(out: str | Path, manifest: Manifest) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success record files, write the manifest, swap it in.

    Any exception (KeyboardInterrupt and SystemExit included) removes the temporary folder, so
    `out` is either the previous complete artifact, or absent, never half-written.
    """
    out = Path(out).resolve()
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        manifest.files = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file() and p.name != MANIFEST_NAME
        }
        manifest.versions = {**runtime_versions(), **manifest.versions}
        manifest.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        _fsync_tree(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    if not folder.exists():
        raise ArtifactError(f"{folder}: no such artifact")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder}: not an edgelm artifact (no {MANIFEST_NAME})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: manifest is not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: unknown schema_version {version!r} (this edgelm reads {SCHEMA_VERSION})"
        )
    try:
        manifest = Manifest.from_dict(data)
    except TypeError as err:
        raise ArtifactError(f"{path}: manifest is missing fields ({err})") from None
    _check_files(folder, manifest, verify)
    return manifest


def _check_files(folder: Path, manifest: Manifest, verify: bool) -> None:
    for name, meta in manifest.files.items():
        if Path(name).name != name:
            raise ArtifactError(f"{folder}: manifest names a file outside the artifact: {name!r}")
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: file listed in the manifest is missing")
        size = path.stat().st_size
        if size != meta.get("size"):
            raise ArtifactError(f"{path}: size {size} does not match the manifest ({meta.get('size')})")
        if verify and sha256_of(path) != meta.get("sha256"):
            raise ArtifactError(f"{path}: sha256 does not match the manifest")
