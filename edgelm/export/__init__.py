"""The export side: source checkpoint -> validated artifact. Needs `edgelm[export]` (torch)."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

from edgelm.artifact import Manifest
from edgelm.errors import UnsupportedModelError, UsageError
from edgelm.export.options import ExportOptions
from edgelm.families import family_for_config
from edgelm.paths import read_source_json


def read_source_config(source: Path) -> dict:
    path = source / "config.json"
    if not path.is_file():
        raise UnsupportedModelError(f"{source}: no config.json, so the model family cannot be told")
    return read_source_json(source, "config.json")  # confined, size-limited, UTF-8, an object


def resolve_source(source: str | Path) -> Path:
    """A local folder as is; otherwise a hub id through the Hugging Face cache (offline-aware)."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{path}: expected a model folder, got a file")
        return path
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise UsageError(f"{source}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text))
    except ImportError:
        raise UsageError(f"{source}: no such folder (hub ids need huggingface_hub)") from None
    except Exception as err:  # offline, unknown repo, no cache: all one line for the user
        raise UsageError(f"{source}: no such folder, and the hub could not provide it ({type(err).__name__})") from None


def export(source: str | Path, out: str | Path, options: ExportOptions | None = None) -> Manifest:
    """Export a source model folder to an artifact folder at `out`; returns its manifest."""
    options = options or ExportOptions()
    folder = resolve_source(source)
    config = read_source_config(folder)
    family = family_for_config(config, str(folder))
    spec = family.spec(options.format)  # the (family, format) pair, with its quantization table
    _check_target(options.target, family.name, spec.format)
    # a copy: the caller's options stay as given, so one object can serve exports of several families
    resolved = dataclasses.replace(options, format=spec.format, quant=spec.quant(options.quant).name)
    return family.export_fn(spec.format)(folder, config, Path(out), resolved)


ORT_TARGET_FAMILIES = ("gpt2", "bert")  # exporters that write the .ort file for --target mobile


def _check_target(target: str, family: str, fmt: str) -> None:
    if target not in ("default", "mobile"):
        raise UsageError(f"target {target!r} is not one of: default, mobile")
    if target == "mobile" and (fmt != "onnx" or family not in ORT_TARGET_FAMILIES):
        raise UsageError(f"--target mobile writes ONNX for {', '.join(ORT_TARGET_FAMILIES)} only, "
                         f"not {family} to {fmt}")


class _CallableExportModule(types.ModuleType):
    """Lets `edgelm.export(source, out, quant=...)` work although `edgelm.export` is this package.

    Python binds a subpackage as an attribute of its parent on import, which would shadow a
    function of the same name in `edgelm/__init__.py`; making the package callable keeps one name.
    """

    def __call__(self, source: str | Path, out: str | Path, options: ExportOptions | None = None,
                 **fields) -> Manifest:
        return export(source, out, options or ExportOptions(**fields))


sys.modules[__name__].__class__ = _CallableExportModule
